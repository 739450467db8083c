"""Writing tasks, story mode, candidates and long form."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from llmos.engine.sampling import apply_dry
from llmos.writing import TaskError, WriteRequest, list_tasks, load_task, prepare_write, render
from llmos.writing.edit import distinct_ideas, parse_revision, word_diff
from llmos.writing.rank import rank, repetition
from llmos.writing.story import LoreEntry, Story, StoryError, assemble_context
from llmos.writing.tasks import pick_language

SAMPLE_VARS = {"acrostic": "春夏秋冬", "n": "3", "to": "zh"}


@pytest.mark.parametrize("task", sorted(list_tasks(include_internal=True)))
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_task_renders_in_both_languages(task, lang):
    t = load_task(task)
    assert lang in t.prompts
    brief = "a lighthouse keeper" if lang == "en" else "守灯塔的人"
    messages, _ = render(t, brief, SAMPLE_VARS, chat=True, lang=lang)
    assert messages[-1]["role"] == "user" and brief in messages[-1]["content"]
    text, stops = render(t, brief, SAMPLE_VARS, chat=False, lang=lang)
    assert brief in text and "{{" not in text and "{%" not in text
    if lang == "zh":
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text + messages[-1]["content"])


def test_required_tasks_exist():
    names = set(list_tasks())
    for needed in ["story", "continue", "expand", "shorten", "rewrite", "title", "poem", "outline", "brainstorm",
                   "characters", "plot-twist", "worldbuilding", "slogan", "product", "news", "social", "script",
                   "critique", "translate"]:
        assert needed in names


def test_translate_picks_the_other_language():
    t = load_task("translate")
    text, _ = render(t, "月亮升起来了", {"to": "auto"}, chat=False, lang="zh")
    assert text.rstrip().endswith("English:")
    text, _ = render(t, "The moon rose", {"to": "auto"}, chat=False, lang="en")
    assert text.rstrip().endswith("Chinese:")


def test_language_choice():
    assert pick_language("the sea") == "en"
    assert pick_language("大海") == "zh"
    assert pick_language("the sea", form="五言绝句") == "zh"
    assert pick_language("大海", lang="en") == "en"
    with pytest.raises(TaskError, match="--lang"):
        pick_language("x", lang="fr")


def test_user_templates_and_errors(session_home):
    d = session_home / "templates"
    d.mkdir(exist_ok=True)
    (d / "limerick-card.yaml").write_text(
        "description: My own task\ninstruct: {user: 'Write about {{ brief }} for {{ who }}'}\nbase: 'About {{ brief }}:'\n")
    (d / "broken.yaml").write_text("description: [unclosed\n")
    try:
        with pytest.raises(TaskError, match="broken.yaml"):
            list_tasks()
        (d / "broken.yaml").unlink()
        t = load_task("limerick-card")
        assert set(t.prompts) == {"en", "zh"}
        with pytest.raises(TaskError, match="who"):
            render(t, "cats", {})
        assert "for Bob" in render(t, "cats", {"who": "Bob"})[0][-1]["content"]
        with pytest.raises(TaskError, match="unknown task"):
            load_task("sonnetz")
    finally:
        for f in d.glob("*.yaml"):
            f.unlink()


def test_prepare_write_applies_presets_form_and_bans(tiny_llm):
    from llmos.writing.forms import HanPoem, Verse
    from llmos.writing.tasks import BANNED_PHRASES, banned_sequences

    prompt, params, stops, form = prepare_write(tiny_llm, WriteRequest("poem", "the sea", overrides={"temperature": 0.5}))
    assert params.temperature == 0.5 and params.top_p == 0.95  # request over task preset
    assert params.banned_sequences == banned_sequences(tiny_llm.tokenizer, BANNED_PHRASES) and form is None
    assert params.constraint is None and params.max_tokens == 200  # the poem task's preset
    _, params, _, form = prepare_write(tiny_llm, WriteRequest("poem", "春天", form="五言绝句"))
    assert form.name == "五言绝句" and isinstance(params.constraint, HanPoem)
    assert (params.constraint.lines, params.constraint.templates[0][0].chars) == (4, 5)
    assert params.max_tokens == 200 and params.banned_sequences == []  # the form needs 96; the machine decides
    # (the tiny model's vocabulary has no rhymes for a sonnet's, which rhyme by default)
    _, params, _, form = prepare_write(tiny_llm, WriteRequest("poem", "the sea", {"rhyme": "false"}, form="sonnet"))
    assert isinstance(params.constraint, Verse) and params.max_tokens == 480  # a sonnet needs more than the preset


def test_form_end_to_end_with_the_tiny_model(tiny_llm):
    from llmos.writing import forms

    _, params, _, form = prepare_write(tiny_llm, WriteRequest("poem", "春天", form="藏头诗",
                                                              variables={"acrostic": "春夏秋冬", "chars": "5"}))
    prompt, *_ = prepare_write(tiny_llm, WriteRequest("poem", "春天"))
    result = tiny_llm.generate(prompt, params, n=3)
    assert len(result.completions) == 3
    for c in result.completions:
        assert c.finish_reason == "stop" and forms.check(form, c.text, acrostic="春夏秋冬", chars=5) == [], c.text


def test_dry_penalises_continuing_a_repeat():
    logits = torch.zeros(1, 10)
    history = [1, 2, 3, 4, 9, 1, 2, 3]  # "1 2 3" repeats; before, it was followed by 4
    out = apply_dry(logits, [history], multiplier=1.0, base=2.0, allowed_length=2)
    assert out[0, 4] == pytest.approx(-2.0)  # match length 3: 1 * 2 ** (3 - 2)
    assert (out[0, [0, 1, 2, 3, 5, 6, 7, 8, 9]] == 0).all()
    assert torch.equal(apply_dry(logits, [history], 0.0, 2.0, 2), logits)


def test_ranking():
    class C:
        def __init__(self, i, text, lp):
            self.index, self.text = i, text
            self.logprobs = [type("L", (), {"logprob": lp})()] * 5

    cands = [C(0, "the the the the the the the the", -0.5), C(1, "a quiet harbour before the storm", -1.5),
             C(2, "the moon over water, silver and slow", -1.6)]
    assert repetition(cands[0].text) > 0.5
    order = [r.index for r in rank(cands)]
    assert order[-1] == 0  # likely but repetitive
    with_form = rank(cands, form_check=lambda t: [] if "moon" in t else ["no"])
    assert with_form[0].index == 2


def test_revision_diff_and_ideas():
    revised, suggestions = parse_revision("REVISED:\nHe and I went.\nSUGGESTIONS:\n- Use 'He and I'.\n- Past tense.")
    assert revised == "He and I went." and suggestions == ["Use 'He and I'.", "Past tense."]
    assert parse_revision("Just text") == ("Just text", [])
    diff = word_diff("me and him goes", "He and I went")
    assert ("-", "me") in diff and ("+", "went") in diff
    ideas = distinct_ideas(["1. A cat who owns a bakery.\n2. A cat who owns a bakery in Paris.\n3. A storm that talks."], 5)
    assert ideas == ["A cat who owns a bakery.", "A storm that talks."]


# --- story mode ------------------------------------------------------------------------------


def story_fixture():
    return Story(
        title="Harbour", memory="The narrator is Ada, a lighthouse keeper.",
        text="\n".join(f"Line {i} of the story." for i in range(1, 21)) + "\nThe dragon circled the tower.",
        authors_note="Keep the tone eerie.", authors_note_depth=2,
        lorebook=[
            LoreEntry(["dragon"], "Dragons here are made of fog.", priority=10, name="dragons"),
            LoreEntry(["castle"], "The castle fell a century ago.", priority=50, name="castle"),
            LoreEntry(["tower", "lighthouse"], "The tower's lamp is green.", priority=5, name="tower"),
        ],
    )


def test_lorebook_triggers_only_on_recent_keywords(tiny_llm):
    story = story_fixture()
    prompt, parts = assemble_context(story, tiny_llm.tokenizer, 512, 64)
    lore = [p.text for p in parts if p.kind == "lore"]
    assert lore == ["Dragons here are made of fog.", "The tower's lamp is green."]  # by priority
    assert "castle" not in prompt.lower()
    assert prompt.startswith("The narrator is Ada")
    story.scan_depth = 10  # the dragon line is no longer "recent"... but "tower." is
    _, parts = assemble_context(story, tiny_llm.tokenizer, 512, 64)
    assert [p.text for p in parts if p.kind == "lore"] == ["The tower's lamp is green."]


def test_lore_budget_keeps_the_most_important(tiny_llm):
    story = story_fixture()
    n_dragon = len(tiny_llm.tokenizer.encode("Dragons here are made of fog.", add_bos=False))
    story.lore_budget = n_dragon  # room for one entry
    _, parts = assemble_context(story, tiny_llm.tokenizer, 512, 64)
    assert [p.text for p in parts if p.kind == "lore"] == ["Dragons here are made of fog."]
    assert any(p.kind == "lore-skipped" and "tower" in p.text for p in parts)


def test_authors_note_placement_and_window(tiny_llm):
    story = story_fixture()
    prompt, parts = assemble_context(story, tiny_llm.tokenizer, 512, 64)
    lines = prompt.split("\n")
    assert lines[-3] == "[Author's note: Keep the tone eerie.]"  # 2 lines before the end
    assert lines[-1] == "The dragon circled the tower."
    prompt, parts = assemble_context(story, tiny_llm.tokenizer, 300, 64)  # a small window
    assert len(tiny_llm.tokenizer.encode(prompt)) <= 300 - 64
    assert prompt.endswith("The dragon circled the tower.")
    assert "Line 1 of" not in prompt and "left out" in [p for p in parts if p.kind == "story"][0].reason


def test_story_file_safety(tmp_path):
    path = tmp_path / "s.json"
    story = story_fixture()
    story.save(path)
    story.text += " More."
    story.save(path)
    assert (tmp_path / "s.json.bak").exists()
    assert Story.load(path).text.endswith("More.")
    shorter = Story.load(path)
    shorter.text = "cut"
    with pytest.raises(StoryError, match="less text"):
        shorter.save(path)
    assert Story.load(path).text.endswith("More.")
    path.write_text('{"title": 3}')
    with pytest.raises(StoryError, match="title"):
        Story.load(path)
    path.write_text("{not json")
    with pytest.raises(StoryError, match="not valid JSON"):
        Story.load(path)
    with pytest.raises(StoryError, match="does not exist"):
        Story.load(tmp_path / "missing.json")


def test_sillytavern_card_and_lorebook_import(tmp_path):
    from llmos.cards import read_card

    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Captain Mira", "description": "A smuggler with a heart of gold.", "personality": "wry, loyal",
        "scenario": "A storm on the Salt Sea.", "first_mes": "Hold on to something.", "mes_example": "",
        "character_book": {"entries": [{"keys": ["Salt Sea"], "content": "The Salt Sea is a desert of glass.",
                                        "enabled": True, "insertion_order": 20}]}}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    world = {"entries": {"0": {"key": ["Glassport"], "content": "Glassport is the only harbour.", "order": 5,
                               "disable": False}}}
    (tmp_path / "world.json").write_text(json.dumps(world))
    story = Story()
    story.add_card(read_card(tmp_path / "card.json"))
    story.add_card(read_card(tmp_path / "world.json"))
    assert story.title == "Captain Mira" and story.text == "Hold on to something."
    assert "smuggler" in story.memory and "wry, loyal" in story.memory
    assert [e.keys for e in story.lorebook] == [["Salt Sea"], ["Glassport"]]
    assert story.lorebook[0].priority == 20


# --- long form -------------------------------------------------------------------------------


def test_novel_resumes_from_the_first_missing_stage(tiny_llm, tmp_path):
    from llmos.writing.novel import Novel

    book = tmp_path / "book"
    Novel(tiny_llm, book, "a city where it never rains", chapters=2, seed=1).run()
    files = sorted(p.relative_to(book).as_posix() for p in book.rglob("*.md"))
    assert files == ["chapters/01-plan.md", "chapters/01.md", "chapters/02-plan.md", "chapters/02.md",
                     "ledger/01.md", "ledger/02.md", "outline.md", "premise.md", "summary/01.md", "summary/02.md"]
    assert len([line for line in (book / "outline.md").read_text().splitlines() if line.strip()]) == 2
    (book / "premise.md").write_text("My own premise, edited by hand.\n")
    before = {p: p.stat().st_mtime_ns for p in book.rglob("*.md")}
    time.sleep(0.05)
    (book / "chapters" / "02.md").unlink()
    stages = Novel(tiny_llm, book).run()  # brief, chapters and language come from brief.txt
    regenerated = sorted(s.path.relative_to(book).as_posix() for s in stages if s.generated)
    assert regenerated == ["chapters/02.md", "ledger/02.md", "summary/02.md"]
    assert (book / "premise.md").read_text() == "My own premise, edited by hand.\n"
    for p, mtime in before.items():
        if p.relative_to(book).as_posix() not in regenerated + ["chapters/02.md"]:
            assert p.stat().st_mtime_ns == mtime


# --- command line ----------------------------------------------------------------------------


def llmos(*args, home, stdin=None):
    env = {**os.environ, "LLMOS_HOME": str(home), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "llmos", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=600)


def test_cli_write_form_rank_and_errors(tiny_dir, session_home):
    proc = llmos("write", "poem", "春天", "-m", str(tiny_dir), "--form", "五言绝句", "-n", "2", "--rank",
                 "--seed", "1", "--json", home=session_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["form"]["problems"] == [[], []]
    assert len(data["ranking"]) == 2 and {"likelihood", "form", "repetition", "distinctness"} <= set(data["ranking"][0])
    for args, needle in [
        (["write", "poem", "x", "--form", "rondeau"], "unknown form"),
        (["write", "poem", "x", "--form", "villanelle"], "try --var rhyme=false"),  # no rhymes in its vocabulary
        (["write", "poem", "x", "--form", "五言绝句", "--var", "acrostic=春夏秋冬雪"], "4 lines"),
        (["write", "poem", "x", "--form", "藏头诗"], "acrostic"),
        (["write", "nosuchtask", "x"], "unknown task"),
        (["write", "poem", "x", "--lang", "fr"], "--lang"),
    ]:
        p = llmos(*args, "-m", str(tiny_dir), home=session_home)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_cli_story(tiny_dir, session_home, tmp_path):
    path = tmp_path / "tale.json"
    assert llmos("story", "new", str(path), "--title", "Tale", "--text", "Once the sea was quiet.",
                 "--memory", "A quiet harbour town.", "--note", "Slow and sad.", home=session_home).returncode == 0
    assert llmos("story", "lore", str(path), "--keys", "sea,harbour", "--content", "The sea is grey.",
                 home=session_home).returncode == 0
    proc = llmos("story", "continue", str(path), "-m", str(tiny_dir), "--max-tokens", "8", "--show-context",
                 "--seed", "1", home=session_home)
    assert proc.returncode == 0, proc.stderr
    assert "The sea is grey." in proc.stderr and "keyword" in proc.stderr and "Author's Note" in proc.stderr
    story = Story.load(path)
    assert story.text.startswith("Once the sea was quiet.") and len(story.text) > len("Once the sea was quiet.")
    assert (tmp_path / "tale.json.bak").exists()
    path.write_text("{broken")
    p = llmos("story", "continue", str(path), "-m", str(tiny_dir), home=session_home)
    assert p.returncode == 2 and "not valid JSON" in p.stderr
