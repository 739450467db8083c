"""Fine-tuning: instruction data with the loss on the assistant's tokens, packed examples, LoRA
adapters stored small and merged at load, `llmos finetune` and `llmos merge`, early stopping,
exact resume, and the errors a user meets."""

import json
import shutil

import pytest
import torch

from helpers import assert_clean_error, llmos, write_jsonl
from llmos.data.prepare import PrepareConfig, PrepareError, prepare
from llmos.train.data import TokenData
from llmos.train.trainer import TrainConfig, TrainError, Trainer


def chats(n=40) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"messages": [{"role": "system", "content": "Answer with the number."},
                                 {"role": "user", "content": f"say {i}"},
                                 {"role": "assistant", "content": f"number {i} it is"}]})
        out.append({"prompt": f"count to {i % 7 + 1} (#{i})", "completion": " ".join(map(str, range(1, i % 7 + 2)))})
    return out


@pytest.fixture(scope="module")
def sft_data(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    prepare(PrepareConfig([str(write_jsonl(d / "chats.jsonl", chats()))], str(d / "data"), str(tiny_dir)))
    return d / "data"


def tiny_tokenizer(tiny_dir):
    from llmos.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_dir)


def test_the_loss_is_on_what_the_assistant_writes(tiny_dir):
    from llmos.data.sft import render

    tok = tiny_tokenizer(tiny_dir)
    messages = chats(1)[0]["messages"] + [{"role": "user", "content": "and again?"},
                                          {"role": "assistant", "content": "still 0"}]
    ids, mask = render(tok, messages)
    assert tok.decode(ids, skip_special=False) == tok.render_chat(messages, add_generation_prompt=False)
    learned = [i for i, m in zip(ids, mask) if m]
    # each reply with the end-of-turn marker the template puts after it, nothing of the prompt
    assert tok.decode(learned, skip_special=False) == "number 0 it is<|im_end|>\nstill 0<|im_end|>\n"


def test_prepare_instruction_data(sft_data):
    meta = json.loads((sft_data / "meta.json").read_text())
    report = json.loads((sft_data / "report.json").read_text())
    assert meta["instruction"] and report["train_documents"] + report["val_documents"] == 80
    assert 0 < report["loss_tokens"]["train"] < report["train_tokens"]
    data = TokenData(sft_data)
    ids, mask, starts = data.examples["train"]
    assert len(starts) == report["train_documents"] and len(mask) == len(ids)


def test_packed_batches_keep_examples_apart(sft_data, tiny_llm):
    data = TokenData(sft_data)
    x, y, seg = data.packed_batch("train", 4, 200, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == seg.shape == (4, 200)
    assert all(seg[b].unique().numel() >= 2 for b in range(4))  # several examples per row
    ids, mask, starts = data.examples["train"]
    assert (y != -100).sum() < (seg >= 0).sum()  # prompts and padding carry no loss
    # packed, each example reads what it reads alone
    model = tiny_llm.model
    with torch.no_grad():
        packed = model(x, segments=seg)
        for b in range(2):
            for k in seg[b].unique().tolist():
                cols = (seg[b] == k).nonzero().flatten()
                alone = model(x[b : b + 1, cols])
                assert torch.allclose(packed[b, cols], alone[0], atol=1e-4)


def test_a_bad_line_in_instruction_data_is_an_error(tiny_dir, tmp_path):
    records = chats(5) + [{"messages": [{"role": "user", "content": "hi"}]}]  # no assistant turn
    src = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(PrepareError, match=r"bad\.jsonl:11: the conversation has no assistant turn"):
        prepare(PrepareConfig([str(src)], str(tmp_path / "out"), str(tiny_dir)))
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(PrepareError, match="--tokenizer MODEL"):
        prepare(PrepareConfig([str(write_jsonl(tmp_path / "ok.jsonl", chats(5)))], str(tmp_path / "out2")))
    src = write_jsonl(tmp_path / "odd.jsonl", chats(5) + [{"question": "what?"}])
    with pytest.raises(PrepareError, match=r"odd\.jsonl:11: no string 'text' field"):
        prepare(PrepareConfig([str(src)], str(tmp_path / "out3"), str(tiny_dir)))


def lora_config(tiny_dir, **kw):
    base = dict(init_from=str(tiny_dir), lora=4, batch_size=4, block_size=48, max_steps=12, eval_interval=6,
                eval_iters=2, log_interval=1, warmup_steps=2, lr=5e-3, sample_tokens=8)
    base.update(kw)
    return TrainConfig(**base)


def test_a_lora_run_stores_only_the_adapter_and_loads_merged(sft_data, tiny_dir, tmp_path):
    from llmos.llm import LLM
    from llmos.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    trainer = Trainer(sft_data, run, lora_config(tiny_dir))
    first = trainer.evaluate()["val_loss"]
    final = trainer.run()
    assert final["val_loss"] < first  # the held-out assistant tokens got likelier
    ckpt = latest_checkpoint(run)
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "adapter.safetensors", "tokenizer.json", "train_state.pt"}
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["adapter"]["rank"] == 4 and len(meta["adapter"]["base"]["sha256"]) == 64
    assert (ckpt / "adapter.safetensors").stat().st_size < (tiny_dir / "model.safetensors").stat().st_size / 4
    # the run loads like any model, merged into plain weights: the trained model's logits
    ids = torch.tensor([[5, 9, 77, 120, 3]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(ids)
        merged = LLM.load(str(run), precision="fp32")
        assert torch.allclose(merged.model(ids), expected, atol=1e-4)
        base = LLM.load(str(tiny_dir), precision="fp32")
        assert not torch.allclose(base.model(ids), expected, atol=1e-3)
    assert not any(type(m).__name__ == "LoRALinear" for m in merged.model.modules())  # no adapter at run time


def test_lora_resume_continues_exactly(sft_data, tiny_dir, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    Trainer(sft_data, straight, lora_config(tiny_dir)).run()
    Trainer(sft_data, halves, lora_config(tiny_dir)).run(until_step=6)
    Trainer(sft_data, halves, lora_config(tiny_dir), resume=True).run()
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (halves / "metrics.jsonl").read_text().splitlines()]
    la = [r["loss"] for r in a if "tokens_per_s" in r]
    lb = [r["loss"] for r in b if "tokens_per_s" in r]
    assert len(la) == len(lb) == 12 and la == pytest.approx(lb, abs=1e-5)


def run_with_scripted_losses(data, tiny_dir, run, monkeypatch, losses: list[float]) -> dict:
    """A LoRA run evaluated every 2 steps, stopping after 2 evaluations without a gain, whose
    validation losses are `losses` in turn."""
    scripted = iter(losses)

    def evaluate(self):
        return {"train_loss": 1.0, "val_loss": next(scripted), "val_ppl": 1.0}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return Trainer(data, run, lora_config(tiny_dir, eval_interval=2, max_steps=20, early_stop=2)).run()


def test_early_stopping_keeps_the_best_checkpoint(sft_data, tiny_dir, tmp_path, monkeypatch):
    from llmos.weights.store import resolve

    run = tmp_path / "run"  # validation losses before training, then after steps 2, 4, 6, ...
    final = run_with_scripted_losses(sft_data, tiny_dir, run, monkeypatch, [3.0, 2.0, 2.5, 2.6, 9.9])
    assert final.get("early_stopped") and final["step"] == 6
    assert (run / "BEST").read_text() == "step-0000002" and (run / "step-0000002").is_dir()
    assert resolve(str(run)).name == "step-0000002"  # the run folder loads its best checkpoint
    # a BEST naming a checkpoint that is gone (stopped between pruning and pointing): the newest loads
    (run / "BEST").write_text("step-0000099")
    assert resolve(str(run)).name == (run / "LATEST").read_text()


def test_early_stopping_when_nothing_beats_the_start(sft_data, tiny_dir, tmp_path, monkeypatch):
    """The starting model is reported, not a candidate: BEST is the best checkpoint saved."""
    run = tmp_path / "run"
    final = run_with_scripted_losses(sft_data, tiny_dir, run, monkeypatch, [1.0, 2.0, 1.9, 2.5, 2.6])
    assert final.get("early_stopped") and final["step"] == 8
    assert (run / "BEST").read_text() == "step-0000004"


def test_lora_options_and_adapters_that_cannot_load(sft_data, tiny_dir, tmp_path):
    with pytest.raises(TrainError, match="nope match no module|unknown LoRA target"):
        Trainer(sft_data, tmp_path / "a", lora_config(tiny_dir, lora_targets=["nope"]))
    with pytest.raises(TrainError, match="--init-from"):
        TrainConfig(lora=4).validate()
    with pytest.raises(TrainError, match="muon"):
        lora_config(tiny_dir, optimizer="muon").validate()
    # an adapter whose base is gone, or has other weights, is refused with the reason
    from llmos.weights.store import ModelError, load_checkpoint

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    meta = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**meta, "name": "my-base"}))  # found by its path, not by name
    run = tmp_path / "run"
    Trainer(sft_data, run, lora_config(base, max_steps=2, eval_interval=2)).run()
    ckpt = run / (run / "LATEST").read_text()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        stored_as = f.metadata()  # which tensors are quantized blocks
    state = load_file(str(base / "model.safetensors"))
    state["norm.weight"] = state["norm.weight"] + 1
    save_file(state, str(base / "model.safetensors"), metadata=stored_as)
    with pytest.raises(ModelError, match="another version of the model"):
        load_checkpoint(ckpt, "fp32")
    # a base re-converted by a newer store lists its earlier hash: the adapter fits again
    trained_on = json.loads((ckpt / "config.json").read_text())["adapter"]["base"]["sha256"]
    (base / "config.json").write_text(json.dumps({**meta, "name": "my-base", "earlier_sha256": [trained_on]}))
    assert load_checkpoint(ckpt, "fp32").model is not None
    shutil.rmtree(base)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["adapter"]["base"]["name"] = "no-such-model"
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="not here"):
        load_checkpoint(ckpt, "fp32")


def test_finetune_and_merge_commands(tiny_dir, session_home, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chats(20))
    proc = llmos("finetune", str(data), "-m", str(tiny_dir), "-o", str(tmp_path / "run"), "--lora", "4",
                 "--max-steps", "4", "--eval-interval", "2", "--block-size", "48", home=session_home)
    assert proc.returncode == 0, proc.stderr
    assert "held-out examples" in proc.stderr and "carry the loss" in proc.stderr
    gen = llmos("generate", "say 3", "--chat", "-m", str(tmp_path / "run"), "--max-tokens", "4", "--json",
                "--precision", "fp32", home=session_home)
    assert gen.returncode == 0, gen.stderr
    merged = llmos("merge", str(tmp_path / "run"), "-o", str(tmp_path / "merged"), home=session_home)
    assert merged.returncode == 0, merged.stderr
    again = llmos("generate", "say 3", "--chat", "-m", str(tmp_path / "merged"), "--max-tokens", "4", "--json",
                  "--precision", "fp32", home=session_home)
    assert json.loads(again.stdout)["completions"][0]["tokens"] == json.loads(gen.stdout)["completions"][0]["tokens"]
    assert not json.loads((tmp_path / "merged" / "config.json").read_text()).get("adapter")
    # full fine-tuning of a plain text corpus, through the same command
    (tmp_path / "story.txt").write_text("The sea was grey and the gulls were loud. " * 120)
    full = llmos("finetune", str(tmp_path / "story.txt"), "-m", str(tiny_dir), "-o", str(tmp_path / "full"),
                 "--max-steps", "2", "--eval-interval", "2", "--block-size", "32", home=session_home)
    assert full.returncode == 0, full.stderr
    assert (tmp_path / "full" / (tmp_path / "full" / "LATEST").read_text() / "model.safetensors").is_file()


def test_finetune_resume_keeps_the_runs_options(tiny_dir, session_home, tmp_path):
    (tmp_path / "story.txt").write_text("The sea was grey and the gulls were loud. " * 120)
    common = ["-m", str(tiny_dir), "-o", str(tmp_path / "run"), "--eval-interval", "2", "--block-size", "32"]
    first = llmos("finetune", str(tmp_path / "story.txt"), *common, "--lora", "2", "--lr", "0.002", "--max-steps", "2",
                  home=session_home)
    assert first.returncode == 0, first.stderr
    again = llmos("finetune", str(tmp_path / "story.txt"), *common, "--max-steps", "4", home=session_home)
    assert_clean_error(again, "already holds a training run", "--resume")
    resumed = llmos("finetune", str(tmp_path / "story.txt"), *common, "--max-steps", "4", "--resume", home=session_home)
    assert resumed.returncode == 0, resumed.stderr
    saved = json.loads((tmp_path / "run" / (tmp_path / "run" / "LATEST").read_text() / "config.json").read_text())
    assert saved["step"] == 4 and saved["train"]["lora"] == 2 and saved["train"]["lr"] == 0.002


@pytest.mark.parametrize("args, needle", [
    (["--lora", "4", "--lora-targets", "wq"], "unknown LoRA target"),
    (["--lora", "-2"], "lora (the rank)"),
])
def test_finetune_bad_options(tiny_dir, session_home, tmp_path, args, needle):
    data = write_jsonl(tmp_path / "chats.jsonl", chats(5))
    proc = llmos("finetune", str(data), "-m", str(tiny_dir), "-o", str(tmp_path / "run"), "--max-steps", "2",
                 "--block-size", "48", *args, home=session_home)
    assert_clean_error(proc, needle)


def test_finetune_refuses_a_broken_jsonl_line(tiny_dir, session_home, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chats(5) + [{"prompt": "no completion"}])
    proc = llmos("finetune", str(data), "-m", str(tiny_dir), "-o", str(tmp_path / "run"), home=session_home)
    assert_clean_error(proc, "chats.jsonl:11", "completion")
    assert not (tmp_path / "run" / "data").exists()
    merged = llmos("merge", str(tiny_dir), "-o", str(tmp_path / "m"), home=session_home)
    assert_clean_error(merged, "not an adapter")
