"""The one lorebook engine (writing/lorebook.py) and its formats: SillyTavern World Info, the
card-embedded character_book, NovelAI .lorebook; its use in story mode and in chat."""

import copy
import json
import random
import time

import pytest
from typer.testing import CliRunner

from llmos.chat.memory import build_context
from llmos.chat.personas import persona_from_card_data
from llmos.cards import card_from_dict
from llmos.cli import app
from llmos.writing.lorebook import (LoreEntry, LorebookError, activate, from_character_book, from_novelai,
                                    from_world_info, read_entries, to_character_book, to_novelai, to_world_info)
from llmos.writing.story import Story, StoryError, assemble_context


def st_entry(uid, **fields):
    """A World Info entry with every field SillyTavern writes (its new-entry template, 1.12-1.19)."""
    entry = {"uid": uid, "key": [], "keysecondary": [], "comment": "", "content": "", "constant": False,
             "vectorized": False, "selective": True, "selectiveLogic": 0, "addMemo": True, "order": 100,
             "position": 0, "disable": False, "ignoreBudget": False, "excludeRecursion": False,
             "preventRecursion": False, "matchPersonaDescription": False, "matchCharacterDescription": False,
             "delayUntilRecursion": False, "probability": 100, "useProbability": True, "depth": 4,
             "outletName": "", "group": "", "groupOverride": False, "groupWeight": 100, "scanDepth": None,
             "caseSensitive": None, "matchWholeWords": None, "useGroupScoring": None, "automationId": "",
             "role": 0, "sticky": 0, "cooldown": 0, "delay": 0, "displayIndex": uid, "triggers": []}
    entry.update(fields)
    return entry


WORLD = {"entries": {
    "0": st_entry(0, key=["Glassport"], comment="Glassport", content="Glassport is the only harbour.", order=50),
    "1": st_entry(1, key=["Mira"], keysecondary=["storm", "sea"], selectiveLogic=3, comment="Mira at sea",
                  content="Mira never sails in a storm.", position=4, depth=2, role=1),
    "2": st_entry(2, key=["/drag(on|ons)/i"], comment="dragons", content="Dragons here are made of fog.",
                  probability=30, useProbability=False, group="beasts", groupWeight=70, scanDepth=1,
                  caseSensitive=True, matchWholeWords=True, excludeRecursion=True, preventRecursion=True),
    "3": st_entry(3, key=["x"], comment="off", content="Never seen.", disable=True, constant=True, position=1,
                  selectiveLogic=2, selective=False, keysecondary=["y"], sticky=2),
}}


def entry(keys, content="text", **kw):
    return LoreEntry(keys, content, **kw)


def fire(entries, text, budget=10_000, **kw):
    return activate(entries, lambda depth: text, lambda t: len(t.split()), budget, rng=random.Random(0), **kw)


def names(found):
    return [f.entry.name for f in found]


# -- formats ----------------------------------------------------------------------------------


def test_world_info_every_field_is_read():
    e = {x.uid: x for x in from_world_info(copy.deepcopy(WORLD), "world.json")}
    assert (e["0"].keys, e["0"].priority, e["0"].position, e["0"].name) == (["Glassport"], 50, "before_char", "Glassport")
    assert (e["1"].secondary_keys, e["1"].logic, e["1"].position, e["1"].depth, e["1"].role) == \
        (["storm", "sea"], "and_all", "at_depth", 2, "user")
    d = e["2"]
    assert d.probability == 100  # useProbability false: the 30 is kept for the export, not rolled
    assert (d.group, d.group_weight, d.scan_depth, d.case_sensitive, d.whole_words) == ("beasts", 70, 1, True, True)
    assert d.exclude_recursion and d.prevent_recursion and d.extra["sticky"] == 0
    assert not e["3"].enabled and e["3"].constant and e["3"].position == "after_char" and e["3"].logic == "not_any"
    assert e["3"].secondary_keys == []  # selective false: secondary keys are not used


@pytest.mark.parametrize("number,name", [(0, "and_any"), (1, "not_all"), (2, "not_any"), (3, "and_all")])
def test_sillytavern_selective_logic_numbers(number, name):
    data = {"entries": {"0": st_entry(0, key=["a"], content="c", selectiveLogic=number)}}
    assert from_world_info(data, "w")[0].logic == name
    assert to_world_info(from_world_info(data, "w"))["entries"]["0"]["selectiveLogic"] == number


def test_world_info_round_trip_is_exact():
    assert to_world_info(from_world_info(copy.deepcopy(WORLD), "w")) == WORLD


def test_character_book_shape_and_sillytavern_extensions():
    book = {"name": "Mira's book", "entries": [
        {"keys": ["Kestrel"], "content": "The Kestrel is an airship.", "enabled": True, "insertion_order": 20,
         "name": "ship", "comment": "the ship", "secondary_keys": ["deck"], "selective": True, "constant": False,
         "position": "after_char", "id": 7, "extensions": {"position": 4, "depth": 1, "role": 2, "selectiveLogic": 1,
                                                           "probability": 40, "useProbability": True, "custom": {"a": 1}}},
        {"keys": ["storm"], "content": "Storms come from the north.", "enabled": False, "insertion_order": 5},
        {"keys": ["^gale\\b"], "use_regex": True, "content": "A V3 regex entry.", "insertion_order": 1}]}
    a, b, c = from_character_book(copy.deepcopy(book), "card")
    assert c.regex and c.first_key("Gale force") == "^gale\\b" and c.first_key("a gale") is None
    assert (a.priority, a.position, a.depth, a.role, a.logic, a.probability) == (20, "at_depth", 1, "assistant", "not_all", 40)
    assert a.name == "the ship" and a.uid == "7" and not b.enabled and b.position == "before_char"
    out = to_character_book([a, b, c], "Mira's book")
    assert out["entries"][2]["use_regex"] is True
    assert out["entries"][0]["extensions"]["custom"] == {"a": 1}  # unknown extensions kept
    assert out["entries"][0]["name"] == "ship" and out["entries"][0]["extensions"]["position"] == 4
    again = from_character_book(out, "again")
    assert [(x.keys, x.position, x.depth, x.role, x.logic, x.probability, x.enabled) for x in again] == \
        [(x.keys, x.position, x.depth, x.role, x.logic, x.probability, x.enabled) for x in (a, b, c)]


def test_novelai_lorebook_and_unknown_version():
    nai = {"lorebookVersion": 5, "entries": [
        {"text": "Ada keeps the lighthouse.", "contextConfig": {"prefix": "", "suffix": "\n", "budgetPriority": 400,
                                                                 "insertionPosition": -1},
         "displayName": "Ada", "keys": ["Ada", "keeper"], "searchRange": 1000, "enabled": True,
         "forceActivation": False, "id": "a1", "category": ""},
        {"text": "It always rains.", "displayName": "Weather", "keys": [], "forceActivation": True, "id": "w"}],
        "settings": {"orderByKeyLocations": False}, "categories": []}
    ada, weather = from_novelai(nai, "w.lorebook")
    assert (ada.keys, ada.priority, ada.name, weather.constant) == (["Ada", "keeper"], 400, "Ada", True)
    back = to_novelai([ada, weather])
    assert back["entries"][0]["searchRange"] == 1000 and back["entries"][0]["contextConfig"]["insertionPosition"] == -1
    assert [e.content for e in read_entries(back, "again")] == ["Ada keeps the lighthouse.", "It always rains."]
    for version in (99, "5", None, True):
        with pytest.raises(LorebookError, match="lorebookVersion"):
            read_entries({**nai, "lorebookVersion": version}, "w.lorebook")


@pytest.mark.parametrize("data,needle", [
    ({"entries": {"0": {"key": ["a"], "content": 3}}}, "'content' must be text"),
    ({"entries": {"0": {"key": ["a"], "content": "c", "selectiveLogic": 9}}}, "unknown selectiveLogic 9"),
    ({"entries": {"0": {"key": ["a"], "content": "c", "position": "middle"}}}, "unknown position"),
    ({"entries": 3}, "not a lorebook"),
    ([], "must be a JSON object"),
])
def test_bad_lorebooks_say_what(data, needle):
    with pytest.raises(LorebookError, match=needle):
        read_entries(data, "bad.json")


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("logic,text,fires", [
    ("and_any", "Mira and the sea", True), ("and_any", "Mira alone", False),
    ("and_all", "Mira, storm and sea", True), ("and_all", "Mira and the sea", False),
    ("not_any", "Mira alone", True), ("not_any", "Mira and the sea", False),
    ("not_all", "Mira and the sea", True), ("not_all", "Mira, storm and sea", False),
])
def test_secondary_key_logic(logic, text, fires):
    e = entry(["Mira"], secondary_keys=["storm", "sea"], logic=logic, name="m")
    assert names(fire([e], text).placed) == (["m"] if fires else [])


def test_case_whole_words_and_regex_keys():
    entries = [entry(["Sea"], name="case", case_sensitive=True), entry(["art"], name="whole", whole_words=True),
               entry(["/drag(on|ons)\\b/i"], name="regex"), entry(["art"], name="part")]
    assert sorted(names(fire(entries, "the sea, a party, DRAGONS").placed)) == ["part", "regex"]
    assert sorted(names(fire(entries, "The Sea of art").placed)) == ["case", "part", "whole"]
    start = time.perf_counter()  # a catastrophic pattern gets a time limit, not the whole prompt's time
    assert names(fire([entry(["/(a+)+$/"], name="slow")], "a" * 40 + "!").placed) == []
    assert time.perf_counter() - start < 2
    assert names(fire([entry(["/[unclosed/"], name="plain")], "see /[unclosed/ here").placed) == ["plain"]


def test_recursion_reasons_and_its_switches():
    a = entry(["harbour"], "The harbour has a lighthouse.", name="harbour")
    b = entry(["lighthouse"], "The lighthouse lamp is green.", name="lighthouse")
    c = entry(["lamp"], "Lamps burn whale oil.", name="lamp")
    found = fire([a, b, c], "we reach the harbour")
    assert names(found.placed) == ["harbour", "lighthouse", "lamp"]
    why = {f.entry.name: f.why for f in found.placed}
    assert "recursion step 1" in why["lighthouse"] and "'harbour'" in why["lighthouse"]
    assert "recursion step 2" in why["lamp"]
    b.prevent_recursion = True  # its content brings in nothing
    assert names(fire([a, b, c], "we reach the harbour").placed) == ["harbour", "lighthouse"]
    b.prevent_recursion, b.exclude_recursion = False, True  # only the text itself brings it in
    assert names(fire([a, b, c], "we reach the harbour").placed) == ["harbour"]
    assert names(fire([a, b, c], "harbour", max_steps=0).placed) == ["harbour"]


def test_entries_that_trigger_each_other_are_bounded_and_reported():
    pair = [entry(["ping"], "then pong", name="ping"), entry(["pong"], "then ping", name="pong")]
    found = fire(pair, "ping")  # each fires once: the loop ends by itself
    assert names(found.placed) == ["ping", "pong"] and not found.warnings
    chain = [entry([f"k{i}"], f"see k{i + 1}", name=f"e{i}") for i in range(10)]
    found = fire(chain, "k0", max_steps=3)
    assert names(found.placed) == ["e0", "e1", "e2", "e3"]
    assert len(found.warnings) == 1 and "recursion stopped after 3 steps" in found.warnings[0] and "'e4'" in found.warnings[0]


def test_probability_groups_and_budget():
    never = entry(["sea"], name="never", probability=0)
    found = fire([never], "sea")
    assert found.placed == [] and "0% chance" in found.left_out[0].why
    rolls = {bool(activate([entry(["sea"], probability=50)], lambda d: "sea", len, 99, rng=random.Random(s)).placed)
             for s in range(20)}
    assert rolls == {True, False}
    group = [entry(["sea"], name="a", group="weather", group_weight=1), entry(["sea"], name="b", group="weather", group_weight=1000)]
    wins = [names(activate(group, lambda d: "sea", len, 999, rng=random.Random(s)).placed) for s in range(10)]
    assert all(len(w) == 1 for w in wins) and wins.count(["b"]) >= 9
    group[0].group_override = True
    found = fire(group, "sea")
    assert names(found.placed) == ["a"] and "group 'weather'" in found.left_out[0].why
    budget = [entry(["sea"], "one two three", name="low", priority=1), entry(["sea"], "four five", name="high", priority=9)]
    found = fire(budget, "sea", budget=3)
    assert names(found.placed) == ["high"] and "over the lore budget (3 tokens)" in found.left_out[0].why


def test_an_entry_scans_its_own_depth():
    recent = ["the dragon came", "we ran", "now we rest"]
    shallow = entry(["dragon"], name="shallow", scan_depth=1)
    deep = entry(["dragon"], name="deep", scan_depth=3)
    found = activate([shallow, deep], lambda d: "\n".join(recent[-(d or 2):]), len, 999)
    assert names(found.placed) == ["deep"]


# -- story mode -------------------------------------------------------------------------------


def test_story_places_lore_by_position_and_reports_why():
    story = Story(memory="Ada keeps the lighthouse.", text="\n".join(f"Line {i}." for i in range(1, 9)) + "\nA dragon!",
                  lorebook=[entry(["dragon"], "Before memory.", name="top", position="before_char", priority=3),
                            entry(["dragon"], "After memory.", name="after", priority=2),
                            entry(["dragon"], "Deep in the text.", name="deep", position="at_depth", depth=2, priority=1),
                            entry(["ghost"], "Never.", name="ghost")])
    prompt, parts = assemble_context(story, None, 2048, 64)
    assert prompt.startswith("Before memory.\nAda keeps the lighthouse.\nAfter memory.\n***\n")
    assert prompt.endswith("Line 7.\nDeep in the text.\nLine 8.\nA dragon!")
    reasons = {p.text: p.reason for p in parts if p.kind == "lore"}
    assert 'keyword "dragon"' in reasons["Deep in the text."] and "2 lines before the end" in reasons["Deep in the text."]
    with pytest.raises(StoryError, match="unknown field"):
        Story.from_dict({"lorebook": [{"keys": [], "content": "x", "colour": "red"}]})
    with pytest.raises(StoryError, match="position must be one of"):
        Story.from_dict({"lorebook": [{"keys": [], "content": "x", "position": "middle"}]})


def test_story_reports_runaway_recursion():
    story = Story(text="k0", lorebook=[entry([f"k{i}"], f"see k{i + 1}", name=f"e{i}") for i in range(8)])
    _, parts = assemble_context(story, None, 2048, 64)
    assert [p.kind for p in parts].count("lore") == 4
    assert any(p.kind == "lore-warning" and "recursion stopped" in p.reason for p in parts)


def test_story_import_and_export_lorebooks(tmp_path):
    runner = CliRunner()
    (tmp_path / "world.json").write_text(json.dumps(WORLD))
    nai = {"lorebookVersion": 6, "entries": [{"text": "Ada keeps the light.", "keys": ["Ada"], "displayName": "Ada"}]}
    (tmp_path / "ada.lorebook").write_text(json.dumps(nai))
    story = tmp_path / "tale.json"
    for source, added in (("world.json", "4 lore entries"), ("ada.lorebook", "1 lore entries")):
        r = runner.invoke(app, ["story", "import", str(story), str(tmp_path / source)])
        assert r.exit_code == 0 and added in r.output, r.output
    assert [e.name for e in Story.load(story).lorebook] == ["Glassport", "Mira at sea", "dragons", "off", "Ada"]
    r = runner.invoke(app, ["story", "lore-export", str(story), str(tmp_path / "out.json")])
    assert r.exit_code == 0, r.output
    exported = json.loads((tmp_path / "out.json").read_text())
    assert {k: v for k, v in exported["entries"].items() if k in WORLD["entries"]} == WORLD["entries"]
    (tmp_path / "future.lorebook").write_text(json.dumps({**nai, "lorebookVersion": 42}))
    before = story.read_text()
    r = runner.invoke(app, ["story", "import", str(story), str(tmp_path / "future.lorebook")])
    assert r.exit_code == 2 and "lorebookVersion 42" in r.output and len(r.output.strip().splitlines()) == 1
    assert story.read_text() == before  # nothing half-imported


# -- chat -------------------------------------------------------------------------------------


def card_with_book():
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
        "name": "Mira", "description": "{{char}} captains the Kestrel.", "first_mes": "Aboard, {{user}}!",
        "post_history_instructions": "Answer as {{char}}, in one line.",
        "character_book": {"scan_depth": 2, "entries": [
            {"keys": ["Kestrel"], "content": "The Kestrel is {{char}}'s airship.", "insertion_order": 10,
             "enabled": True, "position": "before_char", "comment": "ship"},
            {"keys": ["storm"], "content": "Storms come from the north.", "insertion_order": 5, "enabled": True,
             "comment": "storms", "extensions": {"position": 4, "depth": 1, "role": 1}},
            {"keys": ["treasure"], "content": "There is no treasure.", "insertion_order": 1, "enabled": True,
             "comment": "treasure"}]}}}


def test_chat_context_places_card_lore_and_post_history():
    persona = persona_from_card_data(card_from_dict(card_with_book(), "mira.json"), "mira.json")
    turns = [{"id": 1, "role": "assistant", "content": "Aboard, you!"},
             {"id": 2, "role": "user", "content": "Tell me about the treasure."},
             {"id": 3, "role": "assistant", "content": "Later."},
             {"id": 4, "role": "user", "content": "Is the Kestrel safe in a storm?"}]
    count = lambda messages: sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)  # noqa: E731
    ctx = build_context(count, persona, [], "", 0, turns, [], 2000)
    system, *rest = ctx.messages
    assert system["content"].startswith("The Kestrel is Mira's airship.\n\n")  # before the character, macros filled
    assert [m["content"] for m in rest] == ["Aboard, you!", "Tell me about the treasure.", "Later.",
                                            "Storms come from the north.", "Is the Kestrel safe in a storm?",
                                            "Answer as Mira, in one line."]
    assert rest[3]["role"] == "user" and rest[-1]["role"] == "system"  # at depth 1 as user; post-history last
    assert "treasure" not in system["content"]  # out of the book's scan depth of 2 messages
    text = ctx.render()
    assert "(lore) 'ship' fired (before char)" in text and 'keyword "Kestrel"' in text
    assert "(lore) 'storms' fired (at depth 1, as user)" in text
    assert ctx.tokens <= 2000


def test_chat_conversation_shows_lore_in_context(tiny_llm, tmp_path):
    from llmos.chat.conversation import ChatSettings, Conversation
    from llmos.chat.sessions import Sessions
    from llmos.db import Store

    persona = persona_from_card_data(card_from_dict(card_with_book(), "mira.json"), "mira.json")
    conv = Conversation(tiny_llm, Sessions(Store(tmp_path / "c.db")), None, persona, settings=ChatSettings(max_tokens=3, seed=1))
    "".join(conv.send("How fast is the Kestrel?"))
    assert "(lore) 'ship' fired" in conv.last_context.render()
    assert conv.last_context.messages[-1] == {"role": "system", "content": "Answer as Mira, in one line."}
    resumed = Conversation(tiny_llm, conv.sessions, conv.id, settings=ChatSettings(max_tokens=3, seed=1))
    "".join(resumed.send("And in a storm?"))  # the card travels with the session
    assert "(lore) 'storms' fired" in resumed.last_context.render()
