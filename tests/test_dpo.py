"""DPO on the one training loop: a preference learnt and measured on held-out prompts, the
reference computed once and kept for a resumed run, supervised steps first, `llmos finetune
--dpo` from a file and from the store, and the errors a writer meets."""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import assert_clean_error, llmos, write_jsonl
from llmos.data.prefs import Pair, prepare_preferences
from llmos.train import dpo
from llmos.train.config import TrainConfig
from llmos.train.trainer import TrainError, Trainer

SIDES = ("yes, kindly and gladly.", "NO! NEVER! GO AWAY!")


def pairs(chosen_first: bool, n: int = 40) -> list[Pair]:
    good, bad = SIDES if chosen_first else SIDES[::-1]
    return [Pair([{"role": "user", "content": f"Question {i}: may I?"}], f"{good} ({i})", f"{bad} ({i})", "import")
            for i in range(n)]


@pytest.fixture(scope="module")
def pair_data(tiny_dir, tmp_path_factory):
    """Pairs whose chosen side is the one the starting model finds less likely, so that learning
    the preference has to change the model's mind."""
    d = tmp_path_factory.mktemp("dpo")
    prepare_preferences(pairs(True), str(tiny_dir), d / "probe", 0.2, seed=1)
    from llmos.weights.store import load_checkpoint

    model = load_checkpoint(tiny_dir, "fp32").model
    before = dpo.evaluate(model, dpo.PairData(d / "probe"), "val", 64, 0.1, None, 64, 4)
    prepare_preferences(pairs(before["logp_acc"] < 0.5), str(tiny_dir), d / "data", 0.2, seed=1)
    return d / "data"


def config(tiny_dir, **over) -> TrainConfig:
    base = dict(init_from=str(tiny_dir), objective="dpo", lora=4, batch_size=4, block_size=64, max_steps=30, lr=3e-3,
                warmup_steps=2, eval_interval=10, eval_iters=4, log_interval=5, sample_tokens=8)
    return TrainConfig(**{**base, **over})


def test_prepared_pairs_mark_the_answers(pair_data, tiny_dir):
    data = dpo.PairData(pair_data)
    assert data.pairs("train") == 32 and data.pairs("val") == 8
    x, y = data.batch("val", np.array([0, 1]), 64)
    assert x.shape[0] == 4  # chosen rows, then rejected rows
    from llmos.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_dir)
    held = [json.loads(line) for line in (pair_data / "val.pairs.jsonl").read_text().splitlines()]
    for row, side in ((0, "chosen"), (2, "rejected")):
        targets = y[row][y[row] != -100].tolist()
        assert held[0][side] in tok.decode(targets)  # the answer (and its end-of-turn), not the prompt
        assert "may I?" not in tok.decode(targets)
    train_prompts = {json.dumps(json.loads(line)["prompt"]) for line in (pair_data / "train.pairs.jsonl").read_text().splitlines()}
    assert not train_prompts & {json.dumps(h["prompt"]) for h in held}


def test_dpo_learns_the_preference_on_held_out_prompts(pair_data, tiny_dir, tmp_path):
    evals = []
    trainer = Trainer(pair_data, tmp_path / "run", config(tiny_dir), on_eval=evals.append)
    last = trainer.run()
    trainer.close()
    first = evals[0]
    assert first["val_pref_acc"] == 0.5 and first["val_margin"] == 0.0  # the model is its own reference
    assert first["val_logp_acc"] < 0.5 and first["val_loss"] == pytest.approx(np.log(2))
    assert last["val_pref_acc"] >= 0.9 and last["val_margin"] > 0.5
    assert last["val_logp_acc"] > 0.5  # chosen answers now more likely than rejected ones, per token
    assert last["val_loss"] < 0.3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("reference_pairs" in r for r in records) == 1
    assert any("pref_acc" in r and "margin" in r for r in records if "loss" in r)
    ref = dpo.load_reference(tmp_path / "run", trainer._reference_stamp())
    assert ref["train"].shape == (32, 2) and ref["val"].shape == (8, 2)
    saved = json.loads((tmp_path / "run" / (tmp_path / "run" / "LATEST").read_text() / "config.json").read_text())
    assert saved["train"]["objective"] == "dpo" and saved["adapter"]["rank"] == 4


def test_the_reference_is_computed_once_and_kept_for_a_resumed_run(pair_data, tiny_dir, tmp_path):
    trainer = Trainer(pair_data, tmp_path / "run", config(tiny_dir, max_steps=20))
    trainer.run(until_step=10)
    trainer.close()
    resumed = Trainer(pair_data, tmp_path / "run", config(tiny_dir, max_steps=20), resume=True)
    assert resumed.reference is not None
    resumed.run()
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("reference_pairs" in r for r in records) == 1
    # a lost cache cannot be rebuilt from a model that has already moved
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    shutil.rmtree(copy / dpo.REFERENCE_DIR)
    with pytest.raises(TrainError, match="lost its reference"):
        Trainer(pair_data, copy, config(tiny_dir, max_steps=30), resume=True)


def test_supervised_steps_first_then_the_reference(pair_data, tiny_dir, tmp_path):
    evals = []  # every weight trains here (no LoRA)
    trainer = Trainer(pair_data, tmp_path / "run", config(tiny_dir, lora=0, lr=1e-3, sft_steps=4, max_steps=8,
                                                          eval_interval=4), on_eval=evals.append)
    trainer.run()
    trainer.close()
    assert "val_pref_acc" not in evals[0] and evals[0]["val_loss"] == evals[0]["val_chosen_nll"]
    at_switch = next(e for e in evals if e["step"] == 4)
    assert at_switch["val_chosen_nll"] < evals[0]["val_chosen_nll"]  # the chosen answers were learnt
    assert at_switch["val_pref_acc"] == 0.5  # the reference is the model as the supervised steps left it
    stamp = json.loads((tmp_path / "run" / dpo.REFERENCE_DIR / "stamp.json").read_text())
    assert stamp["after_step"] == 4
    assert evals[-1]["step"] == 8 and evals[-1]["val_margin"] != 0.0  # DPO steps moved it from there
    assert (tmp_path / "run" / (tmp_path / "run" / "LATEST").read_text() / "model.safetensors").is_file()


def test_dpo_loss_matches_its_formula():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.0])  # chosen (2), rejected (2)
    ref = torch.tensor([-4.0, -5.0, -4.0, -3.0])
    t = dpo.dpo_terms(policy, ref, beta=0.5)
    margins = 0.5 * torch.tensor([(-3 + 4) - (-4 + 4), (-5 + 5) - (-4 + 3)])
    assert float(t["loss"]) == pytest.approx(float(-torch.nn.functional.logsigmoid(margins).mean()))
    assert float(t["pref_acc"]) == 1.0 and float(t["margin"]) == pytest.approx(0.5)


def test_config_errors(tiny_dir):
    for over, needle in [({"init_from": None}, "adapts a trained model"), ({"beta": 0}, "beta must be"),
                         ({"sft_steps": 30}, "sft_steps must be")]:
        with pytest.raises(TrainError, match=needle):
            config(tiny_dir, **over).validate()


def test_finetune_dpo_command(tiny_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    common = ["-m", str(tiny_dir), "--lora", "4", "--max-steps", "4", "--eval-interval", "2", "--block-size", "64",
              "--batch-size", "4"]
    empty = llmos("finetune", "--dpo", *common, "-o", str(tmp_path / "r0"), home=home)
    assert_clean_error(empty, "holds no preference pairs")
    assert not (tmp_path / "r0").exists() or not any((tmp_path / "r0").iterdir())
    records = [p.as_dict() for p in pairs(True, 12)]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    run = llmos("finetune", str(data), "--dpo", "--beta", "0.2", *common, "-o", str(tmp_path / "r1"), home=home)
    assert run.returncode == 0, run.stderr
    assert "held out (other prompts)" in run.stderr and "reference: log-probabilities of 12 pairs" in run.stderr
    assert "pref acc" in run.stderr
    gen = llmos("generate", "Question 3: may I?", "--chat", "-m", str(tmp_path / "r1"), "--max-tokens", "4",
                "--precision", "fp32", home=home)
    assert gen.returncode == 0, gen.stderr
    # from the store: imported pairs, then --source to pick some
    assert llmos("prefs", "import", str(data), home=home).returncode == 0
    stored = llmos("finetune", "--dpo", *common, "-o", str(tmp_path / "r2"), home=home)
    assert stored.returncode == 0, stored.stderr
    assert_clean_error(llmos("finetune", "--dpo", "--source", "studio-pick", *common, "-o", str(tmp_path / "r3"),
                             home=home), "no preference pairs from studio-pick")


def test_finetune_dpo_bad_input(tiny_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    common = ["-m", str(tiny_dir), "--max-steps", "2", "-o", str(tmp_path / "run")]
    one_sided = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": "fine"}])
    assert_clean_error(llmos("finetune", str(one_sided), "--dpo", *common, home=home), "one-sided")
    one_prompt = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                      {"prompt": "p", "chosen": "c", "rejected": "d"}])
    assert_clean_error(llmos("finetune", str(one_prompt), "--dpo", *common, home=home), "share one prompt")
    assert_clean_error(llmos("finetune", *common, home=home), "give the text to learn from")
    assert_clean_error(llmos("finetune", "--dpo", "--source", "nowhere", *common, home=home), "unknown source")
    (tmp_path / "story.txt").write_text("The sea was grey. " * 200)
    prepared = llmos("prepare", str(tmp_path / "story.txt"), "-o", str(tmp_path / "text"), "--tokenizer", "char",
                     home=home)
    assert prepared.returncode == 0, prepared.stderr
    assert_clean_error(llmos("train", str(tmp_path / "text"), "-o", str(tmp_path / "t"), "--objective", "dpo",
                             "--init-from", str(tiny_dir), home=home), "holds text, not preference pairs")
