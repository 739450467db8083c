"""The multi-task objective (next token + InfoNCE style embedding + labels), the document index
and augmentation in `llmos prepare`, and what the style embedding gives: `llmos embed -m RUN`
and `llmos write --rank style:RUN`."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_clean_error, llmos, write_jsonl
from llmos.data import augment
from llmos.data.prepare import PrepareConfig, PrepareError, prepare
from llmos.train.data import TokenData
from llmos.train.multitask import info_nce, recall_at_1
from llmos.train.trainer import TrainConfig, TrainError, Trainer

VOCAB = {
    "ada": "harbour tide gull rope anchor salt keel mast wave".split(),
    "ben": "engine piston gear bolt lathe steam valve rivet crank".split(),
    "cyd": "meadow clover bee hedge barley lark thistle dew plough".split(),
    "dot": "comet orbit nebula star quasar moon eclipse galaxy dust".split(),
}
GENRE = {"ada": "sea", "ben": "work", "cyd": "land", "dot": "sky"}


def author_records(docs_per_author=10, seed=0) -> list[dict]:
    """Four 'authors', each writing with words of their own: a style a tiny model can learn."""
    rng = random.Random(seed)
    out = []
    for author, words in VOCAB.items():
        for k in range(docs_per_author):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))).capitalize() + "."
                         for _ in range(rng.randint(10, 14))]
            paragraphs = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
            out.append({"text": "\n\n".join(paragraphs), "author": author, "label": GENRE[author], "n": k})
    return out


@pytest.fixture(scope="module")
def authors_data(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("authors")
    src = write_jsonl(d / "authors.jsonl", author_records())
    prepare(PrepareConfig([str(src)], str(d / "data"), str(tiny_dir), val_fraction=0.2, group_by="author",
                          augment=["crop", "shuffle"], seed=7))
    return d / "data"


def test_info_nce_is_the_formula():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 5), dim=-1)
    tau = 0.3
    loss, acc = info_nce(z, tau)
    by_hand = []
    for i in range(6):
        pos = i ^ 1
        denominator = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(6) if j != i)
        by_hand.append(-math.log(math.exp(float(z[i] @ z[pos]) / tau) / denominator))
    assert float(loss) == pytest.approx(sum(by_hand) / 6, rel=1e-5)
    # identical pairs, far from the others: every row finds its pair
    pairs = F.normalize(torch.eye(3).repeat_interleave(2, 0), dim=-1)
    assert float(info_nce(pairs, 0.1)[1]) == 1.0
    assert recall_at_1(pairs, [0, 0, 1, 1, 2, 2]) == 1.0
    # rows of the pair's own source are not negatives: one source only leaves the pair alone
    assert float(info_nce(z[:4], tau, torch.zeros(4, dtype=torch.long))[0]) == pytest.approx(0.0, abs=1e-6)
    assert recall_at_1(pairs, [0, 1, 0, 1, 2, 2]) == pytest.approx(1 / 3)


def test_transforms_are_seeded_and_keep_the_text():
    text = "One fish. Two fish! Red fish? Blue fish.\n\nA second paragraph. It has two sentences."
    a = augment.shuffle(text, random.Random(3))
    assert a == augment.shuffle(text, random.Random(3))
    for before, after in zip(text.split("\n\n"), a.split("\n\n")):
        assert sorted(augment.sentences(before)) == sorted(augment.sentences(after))
    lines = "\n".join(f"line {i}" for i in range(20))
    cropped = augment.crop(lines, random.Random(1))
    assert cropped in lines and 10 <= len(cropped.split("\n")) <= 18
    with pytest.raises(augment.AugmentError, match="unknown --augment transform 'jumble'"):
        augment.parse(["crop,jumble"])
    with pytest.raises(augment.AugmentError, match="--augment-model"):
        augment.Augmenter(["backtranslate"])


def test_backtranslation_is_a_seeded_paraphrase_by_the_model(gemma3_dir):
    """Through Chinese and back with the multilingual bundled model: other words, the same lines."""
    text = "The tide came in and the gulls rose.\nA rope lay on the quay."
    from llmos.writing.paraphrase import BackTranslator

    translator = BackTranslator(str(gemma3_dir))
    first = augment.Augmenter(["backtranslate"], seed=3, translator=translator)
    views = first.views(0, text)
    again = augment.Augmenter(["backtranslate"], seed=3, translator=translator).views(0, text)
    assert views == again and len(views) == 1
    name, view = views[0]
    assert name == "backtranslate" and view != text and len(view.split("\n")) == 2
    assert not any("\u4e00" <= ch <= "\u9fff" for ch in view)  # back in English
    assert first.summary()["views_added"] == 1 and 0 < first.log[0]["changed"] <= 1
    print(view)


def test_prepare_writes_a_document_index_and_logs_augmentation(authors_data, tiny_dir, tmp_path):
    meta = json.loads((authors_data / "meta.json").read_text())
    report = json.loads((authors_data / "report.json").read_text())
    data = TokenData(authors_data)
    assert data.labels == ["land", "sea", "sky", "work"] and report["groups"] == 4
    train, val = data.documents["train"], data.documents["val"]
    aug = report["augmentation"]
    assert aug["transforms"] == ["crop", "shuffle"] and aug["views_added"] > 0
    assert len(train) == report["train_documents"] == 32 + aug["views_added"]
    assert len(val) == report["val_documents"] == 8  # validation is never augmented
    assert all(0 < r["changed"] <= 1 for r in aug["views"] if r.get("kept", True))
    # the index covers the token shards exactly, document after document
    assert train[0, 1] == 0 and (train[1:, 1] == train[:-1, 2]).all() and train[-1, 2] == data.tokens("train")
    assert set(train[:, 3].tolist()) == set(val[:, 3].tolist()) == {0, 1, 2, 3}  # author = group
    assert meta["group_by"] == "author"
    # seeded: the same corpus and seed give the same views
    again = tmp_path / "again"
    prepare(PrepareConfig([str(authors_data.parent / "authors.jsonl")], str(again), str(tiny_dir), val_fraction=0.2,
                          group_by="author", augment=["crop", "shuffle"], seed=7))
    assert (again / "train_000.bin").read_bytes() == (authors_data / "train_000.bin").read_bytes()


def test_pair_batches_hold_two_passages_of_one_source(authors_data):
    data = TokenData(authors_data)
    x, y, lengths, groups, labels = data.pair_batch("train", 8, 48, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 48)
    assert (groups[0::2] == groups[1::2]).all() and len(set(groups[0::2].tolist())) == 4
    assert (labels >= 0).all()
    for r in range(8):  # targets stop where a passage does
        assert (y[r, lengths[r]:] == -100).all() and (y[r, : lengths[r]] != -100).all()


def multitask_config(**over) -> TrainConfig:
    base = dict(objective="multitask", batch_size=8, block_size=48, max_steps=40, lr=3e-3, warmup_steps=2,
                eval_interval=20, eval_iters=4, log_interval=5, sample_tokens=4, lambda_cl=1.0, lambda_task=0.5,
                tau=0.1, projection_dim=16)
    return TrainConfig(**{**base, **over})


def test_multitask_training_learns_the_style_embedding(authors_data, tiny_dir, tmp_path):
    from llmos.llm import LLM

    run = tmp_path / "mt"
    cfg = multitask_config(init_from=str(tiny_dir), lora=4)
    final = Trainer(authors_data, run, cfg).run()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "tokens_per_s" in r]
    assert all({"lm_loss", "cl_loss", "task_loss", "cl_acc"} <= set(r) for r in logged)  # each term, every log
    first = next(r for r in lines if "val_cl_loss" in r)
    assert final["val_cl_loss"] < first["val_cl_loss"] and final["val_task_acc"] >= first["val_task_acc"]
    ckpt = run / (run / "LATEST").read_text()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["heads"]["projection_dim"] == 16 and config["heads"]["labels"] == ["land", "sea", "sky", "work"]
    assert (ckpt / "heads.safetensors").is_file() and (ckpt / "adapter.safetensors").is_file()

    llm = LLM.load(str(run), precision="fp32")
    records = author_records(3, seed=99)  # new text by the same authors
    vectors = llm.embed([r["text"] for r in records])
    assert vectors.shape == (12, 16)
    trained = recall_at_1(vectors, [r["author"] for r in records])
    base = recall_at_1(LLM.load(str(tiny_dir), precision="fp32").embed([r["text"] for r in records]),
                       [r["author"] for r in records])
    assert trained == 1.0 and trained >= base
    # a style score: text like the corpus scores above text unlike it
    near, far = llm.style_similarity([records[0]["text"], "zq xv zq xv kk jj " * 10])
    assert -1 <= far < near <= 1


def test_multitask_resume_restores_the_heads(authors_data, tiny_dir, tmp_path):
    cfg = multitask_config(init_from=str(tiny_dir), max_steps=12, eval_interval=6)
    straight = Trainer(authors_data, tmp_path / "a", cfg).run()
    Trainer(authors_data, tmp_path / "b", multitask_config(init_from=str(tiny_dir), max_steps=12, eval_interval=6)).run(until_step=6)
    resumed = Trainer(authors_data, tmp_path / "b", multitask_config(init_from=str(tiny_dir), max_steps=12, eval_interval=6),
                      resume=True).run()
    assert resumed["val_cl_loss"] == pytest.approx(straight["val_cl_loss"], rel=1e-4)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-4)


def test_multitask_needs_two_sources(tiny_dir, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": r["text"]} for r in author_records(3)][:1])
    prepare(PrepareConfig([str(one)], str(tmp_path / "d"), str(tiny_dir)))
    with pytest.raises(TrainError, match="needs 2 or more"):
        Trainer(tmp_path / "d", tmp_path / "run", multitask_config(init_from=str(tiny_dir)))
    with pytest.raises(TrainError, match="batch_size must be even"):
        multitask_config(init_from=str(tiny_dir), batch_size=5).validate()
    with pytest.raises(PrepareError, match="unknown --augment"):
        prepare(PrepareConfig([str(one)], str(tmp_path / "e"), str(tiny_dir), augment=["twist"]))
    assert not (tmp_path / "e").exists() and not (tmp_path / "run").exists()


def test_embed_and_rank_by_style_commands(authors_data, tiny_dir, session_home, tmp_path):
    run = tmp_path / "mt"
    Trainer(authors_data, run, multitask_config(init_from=str(tiny_dir), max_steps=4, eval_interval=4)).run()
    r = llmos("embed", "salt and tide", "a comet", "-m", str(run), home=session_home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dim"] == 16 and len(out["embeddings"]) == 2
    r = llmos("write", "story", "the harbour", "-m", str(tiny_dir), "-n", "3", "--rank", f"style:{run}", "--json",
              "--max-tokens", "8", "--seed", "1", home=session_home)
    assert r.returncode == 0, r.stderr
    ranking = json.loads(r.stdout)["ranking"]
    assert len(ranking) == 3 and all(-1 <= c["style"] <= 1 for c in ranking)
    assert [c["score"] for c in ranking] == sorted((c["score"] for c in ranking), reverse=True)
    r = llmos("write", "story", "the harbour", "-m", str(tiny_dir), "-n", "2", "--rank", f"style:{tiny_dir}", home=session_home)
    assert_clean_error(r, "has no style embedding")
    r = llmos("finetune", str(authors_data.parent / "authors.jsonl"), "-m", str(tiny_dir), "-o", str(tmp_path / "x"),
              "--objective", "multitask", "--batch-size", "5", home=session_home)
    assert_clean_error(r, "batch_size must be even")


def test_lora_multitask_under_fsdp_matches_one_process(authors_data, tiny_dir, session_home, tmp_path):
    """Adapter and heads trained with the model sharded over 2 processes: the same losses as one
    process, and a run that loads like any other."""
    import os
    import subprocess
    import sys

    args = ["finetune", str(authors_data), "-m", str(tiny_dir), "--lora", "4", "--objective", "multitask",
            "--block-size", "48", "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "2",
            "--projection-dim", "16", "--log-interval", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMOS_HOME": str(session_home)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29535",
                          "-m", "llmos", *args, "-o", str(tmp_path / "fsdp"), "--batch-size", "4", "--sharding", "fsdp"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = llmos(*args, "-o", str(tmp_path / "one"), "--batch-size", "8", home=session_home)
    assert one.returncode == 0, one.stderr[-3000:]

    def logged(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = logged(tmp_path / "fsdp"), logged(tmp_path / "one")
    for key in ("loss", "cl_loss"):  # the total, and InfoNCE over the gathered global batch
        assert [r[key] for r in a if "tokens_per_s" in r] == pytest.approx([r[key] for r in b if "tokens_per_s" in r], abs=1e-4)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-4)
    assert a[-1]["val_cl_loss"] == pytest.approx(b[-1]["val_cl_loss"], abs=1e-4)
    from llmos.llm import LLM

    v1 = LLM.load(str(tmp_path / "fsdp"), precision="fp32").embed(["salt and tide"])
    v2 = LLM.load(str(tmp_path / "one"), precision="fp32").embed(["salt and tide"])
    assert torch.allclose(v1, v2, atol=1e-4)
