"""Knowledge bases with the real all-MiniLM-L6-v2 (pulled once into the shared test store):
parity with transformers, splitting, labelled retrieval, FAQ answers, re-adding, bad input."""

import json
import os
import shutil

import pytest
import torch

from conftest import BUNDLED_HOME, REPO
from helpers import assert_clean_error, llmos
from llmos.chat.kb import MAX_WORDS, KBError, KnowledgeBase, split_passages
from llmos.db import Store

SHOP = REPO / "benchmarks" / "data" / "shop"


def test_split_passages_headings_and_faq():
    text = ("# Shop\n\n## Opening hours\n\nWe open at nine.\n\nWe close at six.\n\n"
            "## Can I pay by card?\n\nYes, all major cards.\n\nQ: Do you ship abroad?\nA: Yes, worldwide.\n")
    ps = split_passages(text)
    assert [(p.heading, p.text) for p in ps[:1]] == [("Opening hours", "We open at nine.\nWe close at six.")]
    faq = {p.question: p.answer for p in ps if p.question}
    assert faq == {"Can I pay by card?": "Yes, all major cards.", "Do you ship abroad?": "Yes, worldwide."}
    long = ("word " * 500).replace("word word word word word ", "word word word word word. ")
    parts = split_passages(long)
    assert len(parts) == -(-500 // MAX_WORDS) and all(len(p.text.split()) <= MAX_WORDS for p in parts)
    assert " ".join(p.text for p in parts).split() == long.split()  # nothing lost, in order


@pytest.fixture(scope="module")
def embedder():
    from llmos.embedder import Embedder, pull_embedder

    old = os.environ.get("LLMOS_HOME")
    os.environ["LLMOS_HOME"] = str(BUNDLED_HOME)
    try:
        return Embedder(pull_embedder())
    finally:
        if old is None:
            del os.environ["LLMOS_HOME"]
        else:
            os.environ["LLMOS_HOME"] = old


@pytest.mark.bundled
def test_embedder_matches_transformers(embedder):
    from transformers import AutoModel, AutoTokenizer

    texts = ["The shop opens at nine.", "When do you open?", "一只猫坐在垫子上。"]
    ours = embedder.embed(texts)
    ref_model = AutoModel.from_pretrained(str(embedder.path)).eval()
    tok = AutoTokenizer.from_pretrained(str(embedder.path))
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert float(ours[0] @ ours[1]) > float(ours[0] @ ours[2])


@pytest.fixture(scope="module")
def shop(embedder, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("kb") / "kb.db")
    kb = KnowledgeBase(store, "shop", create=True, embedder=embedder)
    report = kb.add([str(SHOP)])
    assert len(report.added) == 6 and report.passages >= 30
    return kb


@pytest.mark.bundled
def test_labelled_questions_find_their_passage(shop):
    questions = [json.loads(line) for line in (SHOP / "questions.jsonl").read_text().splitlines()]
    found = [any(q["gold"] in h.text for h in shop.search(q["question"], 5)) for q in questions]
    assert sum(found) / len(found) >= 0.9, [q["question"] for q, f in zip(questions, found) if not f]
    top = shop.search("How much is shipping to Australia?", 1)[0]
    assert top.source == "shipping.md" and top.heading == "Shipping costs"


@pytest.mark.bundled
def test_faq_answers_directly_and_chat_cites_sources(shop, tiny_llm):
    from llmos.chat.conversation import ChatSettings, Conversation
    from llmos.chat.sessions import Sessions

    hit = shop.faq_answer("Do you deliver to Ireland?", 0.8)
    assert hit is not None and hit.answer.startswith("Yes. Ireland is in our European Union zone")
    assert shop.faq_answer("What time do you open on Sunday?", 0.8) is None
    conv = Conversation(tiny_llm, Sessions(shop.store), persona="support", kb=shop, settings=ChatSettings(max_tokens=4))
    assert "".join(conv.send("Do you deliver to Ireland?")).endswith("Source: faq.md")
    reply = "".join(conv.send("What time do you open on Sunday?"))
    assert "Sources: [1] shop.md - Opening hours" in reply
    sent = conv.last_context.messages[-1]["content"]
    assert "[1] (shop.md - Opening hours)" in sent and "cite them by number" in sent
    assert sent.endswith("Question: What time do you open on Sunday?")
    assert conv.turns()[-2]["content"] == "What time do you open on Sunday?"  # stored as typed


@pytest.mark.bundled
def test_readding_updates_without_duplicates(embedder, tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(SHOP, docs)
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    kb = KnowledgeBase(Store(tmp_path / "kb.db"), "shop", create=True, embedder=embedder)
    first = kb.add([str(docs)])
    assert [p for p, why in first.skipped] == [str(docs / "binary.txt")] and first.skipped[0][1] == "binary file"
    count = lambda: kb.store.db.execute("SELECT COUNT(*) FROM kb_passages").fetchone()[0]  # noqa: E731
    before = count()
    again = kb.add([str(docs)])
    assert len(again.unchanged) == 6 and again.passages == 0 and count() == before
    shop_md = docs / "shop.md"
    shop_md.write_text(shop_md.read_text().replace("from 11:00 to 16:00", "from 10:00 to 15:00"))
    changed = kb.add([str(docs)])
    assert changed.updated == [str(shop_md.resolve())] and count() == before
    assert "from 10:00 to 15:00" in kb.search("Sunday opening hours", 1)[0].text
    with pytest.raises(KBError, match="no such file"):
        kb.add([str(tmp_path / "missing")])


@pytest.mark.bundled
def test_kb_commands(tmp_path):
    home = tmp_path / "home"
    (home / "embedders").mkdir(parents=True)
    os.symlink(BUNDLED_HOME / "embedders" / "all-minilm-l6-v2", home / "embedders" / "all-minilm-l6-v2")
    added = llmos("kb", "add", "shop", str(SHOP / "faq.md"), str(SHOP / "shop.md"), home=home)
    assert added.returncode == 0, added.stderr
    assert "2 added" in added.stderr
    found = llmos("kb", "search", "shop", "lettering lessons", "-k", "1", home=home)
    assert "shop.md - Calligraphy workshops" in found.stdout
    assert "shop" in llmos("kb", home=home).stdout
    assert_clean_error(llmos("kb", "add", "shop", str(tmp_path / "nope"), home=home), "no such file or folder")
    assert_clean_error(llmos("kb", "search", "nothing", "x", home=home), "no knowledge base named 'nothing'")
    assert_clean_error(llmos("chat", "--kb", "nothing", stdin="hi\n", home=home), "no knowledge base named 'nothing'")
