"""Preference pairs: the one rule that turns a choice into pairs, the store (m005), chat ratings
and retries, `llmos write --pick`, `llmos prefs` and its errors."""

import json

import pytest

from helpers import assert_clean_error, llmos, write_jsonl
from llmos.chat.conversation import ChatSettings, Conversation
from llmos.chat.sessions import Sessions
from llmos.data.prefs import Pair, Preferences, PrefsError, choice_pairs, read_jsonl, split_by_prompt
from llmos.db import Store


def test_choice_pairs_kept_and_ratings():
    texts = ["a", "b", "c", "d"]
    assert choice_pairs(texts, kept=2) == [(2, 0), (2, 1), (2, 3)]
    assert sorted(choice_pairs(texts, ratings=[5, None, 1, 3])) == [(0, 2), (0, 3), (3, 2)]
    # a rating outweighs a keep: not over one rated higher, nor, unrated, over one rated good
    assert (1, 0) not in choice_pairs(texts, kept=1, ratings=[5, 2, None, None])
    assert choice_pairs(texts, kept=1, ratings=[4, None, 2, None]) == [(1, 2), (1, 3), (0, 2)]
    assert choice_pairs(["same", "same "], kept=0) == []  # identical texts are no preference
    with pytest.raises(PrefsError, match="not one of the 2"):
        choice_pairs(["a", "b"], kept=2)


def test_store_dedupes_and_lists_by_source(tmp_path):
    prefs = Preferences(Store(tmp_path / "s.db"))
    chat_prompt = [{"role": "user", "content": "a title?"}]
    assert prefs.record_choice(chat_prompt, ["Rain", "Storm", "Sun"], kept=1, source="write-pick", model="m") == 2
    assert prefs.record_choice(chat_prompt, ["Rain", "Storm", "Sun"], kept=1, source="write-pick", model="m") == 0
    assert prefs.record_choice("Once upon", [" a time", " a hill"], ratings=[1, -1], source="studio-thumbs") == 1
    pairs = prefs.list()
    assert [(p.chosen, p.rejected) for p in pairs] == [("Storm", "Rain"), ("Storm", "Sun"), (" a time", " a hill")]
    assert pairs[0].prompt == chat_prompt and pairs[2].prompt == "Once upon"
    assert [p.source for p in prefs.list("studio-thumbs")] == ["studio-thumbs"]
    stats = {r["source"]: r for r in prefs.stats()}
    assert stats["write-pick"]["pairs"] == 2 and stats["write-pick"]["prompts"] == 1
    with pytest.raises(PrefsError, match="unknown source"):
        prefs.add([Pair("p", "a", "b", "somewhere")])


def test_export_import_round_trip_and_bad_files(tmp_path):
    store = Store(tmp_path / "a.db")
    prefs = Preferences(store)
    prefs.record_choice([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "雨?"}],
                        ["细雨", "大雨倾盆，电闪雷鸣"], kept=0, source="chat-retry", model="m", meta={"session": 3})
    prefs.record_choice("The sea", [" was calm", " roared"], kept=1, source="studio-branch")
    n = prefs.export(tmp_path / "out.jsonl")
    assert n == 2
    other = Preferences(Store(tmp_path / "b.db"))
    assert other.import_jsonl(tmp_path / "out.jsonl") == (2, 2)
    strip = lambda ps: [(p.prompt, p.chosen, p.rejected, p.source, p.model, p.meta) for p in ps]  # noqa: E731
    assert strip(other.list()) == strip(prefs.list())
    # TRL's conversational shape: the answers as messages ending with the assistant's
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                               "chosen": [{"role": "assistant", "content": "hello"}],
                                               "rejected": [{"role": "assistant", "content": "go away"}]}])
    assert [(p.chosen, p.rejected) for p in read_jsonl(trl)] == [("hello", "go away")]
    # a bad line anywhere: nothing of the file is stored
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "y"},
                                               {"prompt": "q", "chosen": "only one side"}])
    with pytest.raises(PrefsError, match=r"bad.jsonl:2: no 'rejected' field; .*one-sided"):
        other.import_jsonl(bad)
    assert len(other.list()) == 2
    for records, needle in [([], "holds no pairs"), ([{"prompt": "p", "chosen": "x", "rejected": "x"}], "same text"),
                            ([{"prompt": 3, "chosen": "x", "rejected": "y"}], "'prompt' must be"),
                            ([{"prompt": "p", "chosen": " ", "rejected": "y"}], "'chosen' is empty")]:
        with pytest.raises(PrefsError, match=needle):
            read_jsonl(write_jsonl(tmp_path / "x.jsonl", records))


def test_split_keeps_each_prompt_on_one_side():
    pairs = [Pair(f"prompt {i % 10}", f"good {i}", f"bad {i}") for i in range(40)]
    train, val = split_by_prompt(pairs, 0.2, seed=0)
    assert len(val) == 8 and len(train) == 32
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    with pytest.raises(PrefsError, match="share one prompt"):
        split_by_prompt([Pair("one", "a", "b"), Pair("one", "c", "d")], 0.2, 0)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from llmos.llm import LLM

    return LLM.load(smollm2_dir)


@pytest.mark.bundled
def test_chat_ratings_and_retries_become_pairs(smollm2, tmp_path):
    store = Store(tmp_path / "chat.db")
    conv = Conversation(smollm2, Sessions(store), persona="writing-coach",
                        settings=ChatSettings(max_tokens=8, seed=1, temperature=1.0))
    first = "".join(conv.send("Suggest a title for a sea story")).strip()
    conv.rate(2)
    conv.settings.seed = 2
    second = "".join(conv.retry()).strip()
    assert first != second
    conv.rate(5)  # two replies to one message, rated differently
    prefs = Preferences(store)
    rated = prefs.list("chat-rating")
    assert [(p.chosen, p.rejected) for p in rated] == [(second, first)]
    prompt = rated[0].prompt
    assert prompt[0]["role"] == "system" and prompt[-1] == {"role": "user", "content": "Suggest a title for a sea story"}
    assert rated[0].model == smollm2.name and rated[0].meta["session"] == conv.id
    # a retry the writer goes on from: the kept reply over the replaced one (agreeing with the ratings)
    conv.settings.seed = 3
    third = "".join(conv.retry()).strip()
    "".join(conv.send("Thanks, and a subtitle?"))
    assert third not in (first, second)
    kept = prefs.list("chat-retry")
    # over the reply rated 2, not over the one rated 5 (a rating outweighs going on)
    assert [(p.chosen, p.rejected) for p in kept] == [(third, first)]


@pytest.mark.bundled
def test_write_pick_stores_pairs_and_prefs_commands(smollm2_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = llmos("write", "slogan", "a bakery by the sea", "-m", str(smollm2_dir), "-n", "3", "--pick", "2",
                 "--seed", "4", "--max-tokens", "12", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    texts = [c["text"] for c in sorted(result["completions"], key=lambda c: c["index"])]
    assert result["pick"]["kept"] == 1 and "preference pair(s) stored" in proc.stderr
    listed = llmos("prefs", "list", "--json", home=home)
    pairs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert pairs and all(p["chosen"] == texts[1] and p["source"] == "write-pick" for p in pairs)
    assert {p["rejected"] for p in pairs} == {t for t in texts if t.strip() != texts[1].strip()}
    assert isinstance(pairs[0]["prompt"], list) and "bakery by the sea" in pairs[0]["prompt"][-1]["content"]
    # --pick ask reads the choice after the candidates
    asked = llmos("write", "slogan", "a bookshop in the rain", "-m", str(smollm2_dir), "-n", "2", "--pick", "ask",
                  "--seed", "5", "--max-tokens", "12", home=home, stdin="1\n")
    assert asked.returncode == 0 and "Keep which candidate?" in asked.stderr, asked.stderr
    stats = json.loads(llmos("prefs", "stats", "--json", home=home).stdout)
    assert stats[0]["source"] == "write-pick" and stats[0]["pairs"] >= len(pairs)
    exported = llmos("prefs", "export", "-o", str(tmp_path / "p.jsonl"), home=home)
    assert exported.returncode == 0 and (tmp_path / "p.jsonl").read_text().count("\n") == stats[0]["pairs"]
    deleted = llmos("prefs", "delete", str(pairs[0]["id"]), home=home)
    assert deleted.returncode == 0, deleted.stderr
    assert len(llmos("prefs", "list", "--json", home=home).stdout.splitlines()) == stats[0]["pairs"] - 1


def test_prefs_bad_input(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert_clean_error(llmos("write", "slogan", "x", "--pick", "1", home=home), "add -n 2 or more")
    assert_clean_error(llmos("write", "slogan", "x", "-n", "2", "--pick", "3", home=home), "from 1 to 2")
    assert_clean_error(llmos("prefs", "list", "--source", "nowhere", home=home), "unknown source")
    one_sided = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": "only"}])
    assert_clean_error(llmos("prefs", "import", str(one_sided), home=home), "one-sided")
    assert_clean_error(llmos("prefs", "import", str(tmp_path / "missing.jsonl"), home=home), "cannot read")
    assert_clean_error(llmos("prefs", "delete", "99", home=home), "not stored")
    empty = llmos("prefs", "list", home=home)
    assert empty.returncode == 0 and "no preference pairs yet" in empty.stderr
