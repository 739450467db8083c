"""`llmos train`: the loop, exact resume, atomic checkpoints, distributed runs, MLM, export."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from llmos.data.prepare import PrepareConfig, prepare
from llmos.train.checkpoint import latest_checkpoint
from llmos.train.config import build_train_config
from llmos.train.trainer import TrainConfig, TrainError, Trainer

SHAKESPEARE = REPO / "benchmarks" / "data" / "tinyshakespeare.txt"
TINY = dict(n_layer=2, n_head=2, d_model=32, max_seq_len=64)


@pytest.fixture(scope="module")
def shake(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "shake.txt"
    src.write_text(SHAKESPEARE.read_text()[:60000])
    prepare(PrepareConfig([str(src)], str(d / "char")))
    return d / "char"


def config(**kw):
    base = dict(preset="tiny", model=dict(TINY), batch_size=8, block_size=32, max_steps=16, eval_interval=8,
                eval_iters=2, log_interval=1, warmup_steps=4, lr=3e-3, sample_tokens=16)
    base.update(kw)
    return TrainConfig(**base)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_writes_a_complete_run(shake, tmp_path):
    run = tmp_path / "run"
    final = Trainer(shake, run, config(max_steps=40, eval_interval=20)).run()
    m = metrics(run)
    first_val = next(r["val_loss"] for r in m if "val_loss" in r)
    assert final["val_loss"] < first_val - 0.5  # 4.2 nats for a uniform guess over ~60 chars
    ckpt = latest_checkpoint(run)
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt"}
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    train_lines = [r for r in m if "tokens_per_s" in r]
    assert len(train_lines) == 40 and all(r["tokens_per_s"] > 0 for r in train_lines)
    assert isinstance(final["sample"], str) and len(final["sample"]) > 16
    # a run folder works wherever a model name does
    from llmos.llm import LLM

    llm = LLM.load(str(run))
    out = llm.generate("ROMEO:", llm.sampling(max_tokens=20, seed=1))
    assert len(out.completions[0].token_ids) == 20


def test_a_time_limit_spent_before_the_first_step_still_leaves_a_checkpoint(shake, tmp_path):
    run = tmp_path / "run"
    final = Trainer(shake, run, config(time_limit=1e-9)).run()
    assert final["step"] == 0 and latest_checkpoint(run).name == "step-0000000"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(shake, tmp_path, optimizer):
    straight = tmp_path / "straight"
    Trainer(shake, straight, config(max_steps=16, optimizer=optimizer)).run()
    halves = tmp_path / "halves"
    Trainer(shake, halves, config(max_steps=16, optimizer=optimizer)).run(until_step=8)
    # the second half: a new process would do the same; the trainer state comes from disk
    Trainer(shake, halves, config(max_steps=16, optimizer=optimizer), resume=True).run()
    a = [r for r in metrics(straight) if "tokens_per_s" in r]
    b = [r for r in metrics(halves) if "tokens_per_s" in r]
    assert [r["step"] for r in b] == list(range(1, 17))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    fa, fb = metrics(straight)[-1], metrics(halves)[-1]
    assert fa["val_loss"] == pytest.approx(fb["val_loss"], abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_muon_learns(shake, tmp_path, arch):
    run = tmp_path / "run"
    final = Trainer(shake, run, config(max_steps=40, eval_interval=20, optimizer="muon",
                                       model=dict(TINY, arch=arch))).run()
    first_val = next(r["val_loss"] for r in metrics(run) if "val_loss" in r)
    assert final["val_loss"] < first_val - 0.5


def test_muon_step_orthogonalizes_each_fused_matrix():
    from llmos.train.optim import Muon, orthogonalize

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 16))  # three stacked 16 x 16 matrices, like q, k, v
    v = torch.nn.Parameter(torch.randn(8, 24))
    w.grad, v.grad = torch.randn(48, 16), torch.randn(8, 24)
    w0, v0 = w.detach().clone(), v.detach().clone()
    Muon([w, v], lr=0.01, weight_decay=0.1, splits={w: [16, 16, 16]}).step()
    # first step: the momentum buffer is (1 - mu) g, the Nesterov update (1 - mu^2) g, and
    # orthogonalization removes the scale
    parts = [orthogonalize(g) for g in w.grad.split(16)]
    expect_w = w0 * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 16**0.5 * torch.cat(parts)
    expect_v = v0 * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 24**0.5 * orthogonalize(v.grad)
    assert torch.allclose(w.detach(), expect_w, atol=1e-5)
    assert torch.allclose(v.detach(), expect_v, atol=1e-5)
    for g in [orthogonalize(torch.randn(64, 16)), orthogonalize(torch.randn(3, 16, 40))]:
        s = torch.linalg.svdvals(g)  # near-orthogonal: singular values near 1, not exactly 1
        assert s.min() > 0.6 and s.max() < 1.25
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.ones(4))])


def test_run_folder_guards(shake, tmp_path):
    run = tmp_path / "run"
    Trainer(shake, run, config(max_steps=4, eval_interval=4)).run()
    with pytest.raises(TrainError, match="--resume"):
        Trainer(shake, run, config(max_steps=8))
    with pytest.raises(TrainError, match="model"):
        Trainer(shake, run, config(max_steps=8, model=dict(TINY, n_layer=3)), resume=True)
    with pytest.raises(TrainError, match="optimizer='adamw'"):
        Trainer(shake, run, config(max_steps=8, optimizer="muon"), resume=True)


@pytest.mark.parametrize("kw, message", [
    (dict(model=dict(TINY, d_model=30, n_head=4)), "divisible by n_head"),
    (dict(lr=2.0), "lr must be"),
    (dict(batch_size=0), "batch_size"),
    (dict(block_size=100), "exceeds the model's context"),
    (dict(objective="gan"), "objective"),
    (dict(optimizer="sgd"), "optimizer must be 'adamw' or 'muon'"),
])
def test_bad_training_options(shake, tmp_path, kw, message):
    with pytest.raises(TrainError, match=message):
        Trainer(shake, tmp_path / "r", config(**kw))


def test_train_config_merges_yaml_flags_and_set(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: small\nlr: 0.002\nbatch_size: 4\ntime_limit: 5m\nmodel: {n_layer: 3, n_head: 2}\n")
    cfg = build_train_config(tmp_path / "run", config_file=yaml_file,
                             flags=dict(lr=0.003, batch_size=None, preset=None), set_pairs=["n_layer=5", "dropout=0.1"])
    assert (cfg.preset, cfg.lr, cfg.batch_size, cfg.time_limit) == ("small", 0.003, 4, 300.0)
    assert cfg.model == {"n_layer": 5, "n_head": 2, "dropout": 0.1}
    assert build_train_config(tmp_path / "run", config_file=yaml_file, flags=dict(time_limit="90s")).time_limit == 90.0
    assert build_train_config(tmp_path / "run") == TrainConfig()
    # YAML reads 1e-4 (no dot) as text; a number written so is still read as one
    yaml_file.write_text("lr: 1e-4\nmin_lr: 1e-5\nwarmup_steps: '20'\n")
    cfg = build_train_config(tmp_path / "run", config_file=yaml_file)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps) == (1e-4, 1e-5, 20)


def test_train_config_on_resume_reuses_the_saved_options(tmp_path):
    run = tmp_path / "run"
    saved = TrainConfig(preset="small", model={"n_layer": 3}, batch_size=5, max_steps=100)
    (run / "step-0000010").mkdir(parents=True)
    (run / "step-0000010" / "config.json").write_text(json.dumps({"train": saved.__dict__}))
    (run / "LATEST").write_text("step-0000010")
    cfg = build_train_config(run, flags=dict(max_steps=200, time_limit="1m", batch_size=9), resume=True)
    assert cfg == TrainConfig(preset="small", model={"n_layer": 3}, batch_size=5, max_steps=200, time_limit=60.0)
    # options that define another model are not replaced by the saved ones (the trainer then refuses the mismatch)
    assert build_train_config(run, flags=dict(preset="tiny"), resume=True).preset == "tiny"
    assert build_train_config(run, flags=dict(max_steps=200)).batch_size == TrainConfig().batch_size


@pytest.mark.parametrize("yaml_text, set_pairs, message", [
    ("", ["n_layers=3"], "unknown model field 'n_layers'"),
    ("", ["n_layer"], "--set takes FIELD=VALUE"),
    ("learning_rate: 0.1\n", [], r"unknown training option\(s\): learning_rate"),
    ("- lr\n", [], "must hold a mapping"),
    ("model: 3\n", [], "'model' must be a mapping"),
    ("time_limit: soon\n", [], "cannot read duration 'soon'"),
    ("lr: 2.0\n", [], "lr must be in"),
    ("lr: fast\n", [], "lr must be a number, got 'fast'"),
])
def test_train_config_errors_name_the_option(tmp_path, yaml_text, set_pairs, message):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(yaml_text)
    with pytest.raises(TrainError, match=message):
        build_train_config(tmp_path / "run", config_file=yaml_file, set_pairs=set_pairs)


def test_corpus_smaller_than_one_window(tmp_path):
    (tmp_path / "small.txt").write_text("tiny corpus, just a few words")
    prepare(PrepareConfig([str(tmp_path / "small.txt")], str(tmp_path / "ds")))
    with pytest.raises(TrainError, match="fewer than one window"):
        Trainer(tmp_path / "ds", tmp_path / "r", config(block_size=64))


def test_failed_save_keeps_the_last_checkpoint(shake, tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(shake, run, config(max_steps=4, eval_interval=4)).run()
    good = latest_checkpoint(run)
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        Trainer(shake, run, config(max_steps=8, eval_interval=4), resume=True).run()
    monkeypatch.undo()
    assert latest_checkpoint(run) == good
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    from llmos.weights.store import load_checkpoint

    load_checkpoint(good, "fp32")


def test_killed_during_training_leaves_a_loadable_checkpoint(shake, tmp_path):
    """SIGKILL at arbitrary moments of a run that saves every step."""
    from llmos.weights.store import load_checkpoint

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llmos", "train", str(shake), "-o", str(run), "--preset", "tiny",
           "--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2", "--set", "max_seq_len=64",
           "--block-size", "32", "--batch-size", "4", "--max-steps", "100000", "--eval-interval", "1", "--eval-iters", "1"]
    for delay in (0.05, 0.37, 0.81):
        before = latest_checkpoint(run)
        proc = subprocess.Popen(cmd + (["--resume"] if before else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while latest_checkpoint(run) == before and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)  # until this process has written a checkpoint of its own
        time.sleep(delay)  # then somewhere in the middle of the next steps and saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(run)
        assert ckpt is not None
        load_checkpoint(ckpt, "fp32")
        torch.load(ckpt / "train_state.pt", weights_only=True)
    assert int(latest_checkpoint(run).name.split("-")[1]) > 0


def test_two_process_ddp_matches_one_process(shake, tmp_path):
    common = ["--preset", "tiny", "--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2",
              "--set", "max_seq_len=64", "--block-size", "32", "--max-steps", "6", "--eval-interval", "6",
              "--eval-iters", "2", "--warmup-steps", "2", "--lr", "0.003", "--log-interval", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "llmos", "train", str(shake), "-o", str(tmp_path / "ddp"), "--batch-size", "4", *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "llmos", "train", str(shake), "-o", str(tmp_path / "one"),
                             "--batch-size", "8", *common], capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert a[-1]["final"] and a[-1]["replicas_identical"] is True
    la = [r["loss"] for r in a if "tokens_per_s" in r]
    lb = [r["loss"] for r in b if "tokens_per_s" in r]
    assert len(la) == len(lb) == 6
    assert la == pytest.approx(lb, abs=1e-4)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-4)


def test_masked_lm_and_embeddings(shake, tmp_path):
    run = tmp_path / "mlm"
    final = Trainer(shake, run, config(objective="mlm", max_steps=30, eval_interval=30)).run()
    m = metrics(run)
    first_val = next(r["val_loss"] for r in m if "val_loss" in r)
    assert final["val_loss"] < first_val
    cfg = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert cfg["model"]["causal"] is False
    from llmos.llm import LLM

    llm = LLM.load(str(run), precision="fp32")
    vecs = llm.embed(["To be, or not to be", "KING HENRY:", "To be, or not to be"])
    assert vecs.shape == (3, 32)
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vecs[0], vecs[2], atol=1e-6)
    from llmos.weights.export import ExportError, export

    with pytest.raises(ExportError, match="masked-LM"):
        export(latest_checkpoint(run), tmp_path / "x")


def test_export_loads_in_transformers_with_equal_logits(shake, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.weights.export import export
    from llmos.weights.store import load_checkpoint

    run = tmp_path / "run"
    Trainer(shake, run, config(max_steps=6, eval_interval=6, model=dict(TINY, n_kv_head=1))).run()
    out = export(latest_checkpoint(run), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ours = load_checkpoint(latest_checkpoint(run), "fp32")
    text = "ROMEO: What light"
    ids = ours.tokenizer.encode(text)
    assert tok(text, add_special_tokens=False).input_ids == ids
    with torch.no_grad():
        a = ours.model(torch.tensor([ids]))
        b = hf(torch.tensor([ids])).logits
    assert (a - b).abs().max().item() < 1e-4


def test_two_process_fsdp_matches_one_process_and_resumes(shake, tmp_path):
    """FSDP shards each block's weights, their gradients and the optimizer state across the
    processes; the arithmetic is the same as one process's, checkpoints are saved whole (they
    load anywhere), and a sharded run resumes from them."""
    common = ["--preset", "tiny", "--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2",
              "--set", "max_seq_len=64", "--block-size", "32", "--eval-interval", "3", "--eval-iters", "2",
              "--warmup-steps", "2", "--lr", "0.003", "--min-lr", "0.003", "--log-interval", "1", "--grad-accum", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
                               "-m", "llmos", "train", str(shake), *args], capture_output=True, text=True, env=env,
                              timeout=600)

    fsdp = torchrun("-o", str(tmp_path / "fsdp"), "--batch-size", "2", "--sharding", "fsdp", "--max-steps", "4", *common)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    resumed = torchrun("-o", str(tmp_path / "fsdp"), "--batch-size", "2", "--sharding", "fsdp", "--max-steps", "6",
                       "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "llmos", "train", str(shake), "-o", str(tmp_path / "one"),
                             "--batch-size", "4", "--max-steps", "6", *common], capture_output=True, text=True, env=env,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = metrics(tmp_path / "fsdp"), metrics(tmp_path / "one")
    la = [r["loss"] for r in a if "tokens_per_s" in r]
    lb = [r["loss"] for r in b if "tokens_per_s" in r]
    assert len(la) == len(lb) == 6
    assert la == pytest.approx(lb, abs=1e-4)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-4)
    saved = json.loads((latest_checkpoint(tmp_path / "fsdp") / "config.json").read_text())
    assert saved["train"]["sharding"] == "fsdp" and saved["step"] == 6
    from llmos.weights.store import load_checkpoint

    one, two = (load_checkpoint(latest_checkpoint(tmp_path / r), "fp32").model.state_dict() for r in ("one", "fsdp"))
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)


def test_a_context_smaller_than_the_sample_prompt_still_samples(shake, tmp_path):
    evals = []
    trainer = Trainer(shake, tmp_path / "r", config(model={**TINY, "max_seq_len": 12}, block_size=8, max_steps=2,
                                                    eval_interval=2), on_eval=evals.append)
    trainer.run()
    trainer.close()
    assert evals[-1]["sample"]  # the 16-token sample prompt is cut to fit
