"""`llmos sweep`: trials on the real trainer, the study in a real SQLite file: results and
best.yaml, resuming, a killed process's trial, pruning, Ctrl-C, and the errors of a bad file."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from llmos.cli import app
from llmos.data.prepare import PrepareConfig, prepare
from llmos.train.checkpoint import latest_checkpoint
from llmos.train.config import build_train_config
from llmos.train.sweep import load_spec, open_study, run_sweep, summary, write_results
from llmos.train.trainer import Trainer

SHAKESPEARE = REPO / "benchmarks" / "data" / "tinyshakespeare.txt"
# a model of a few thousand weights: a trial is a few seconds, most of it the evaluations
BASE = dict(preset="tiny", model=dict(n_layer=1, n_head=2, d_model=16, max_seq_len=32), block_size=16, batch_size=4,
            max_steps=6, eval_interval=3, eval_iters=1, log_interval=3, sample_tokens=4, warmup_steps=2)
SPACE = {"lr": {"low": "1e-3", "high": "2e-2", "log": True}, "batch_size": [2, 4]}
COMPLETE, PRUNED, FAIL, WAITING = (optuna.trial.TrialState[s] for s in ("COMPLETE", "PRUNED", "FAIL", "WAITING"))


@pytest.fixture(scope="module")
def shake(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "shake.txt"
    src.write_text(SHAKESPEARE.read_text()[:20000])
    prepare(PrepareConfig([str(src)], str(d / "char")))
    return d / "char"


def sweep_file(folder, data, **top):
    doc = {"data": str(data), "base": BASE, "space": SPACE, "pruner": "none", "sampler": "random", **top}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.fixture(scope="module")
def finished(shake, tmp_path_factory):
    """A sweep of three trials over lr (a log range) and batch_size (choices)."""
    path = sweep_file(tmp_path_factory.mktemp("sweep"), shake, trials=3)
    spec = load_spec(path)
    study = run_sweep(spec)
    return path, spec, study


def test_a_sweep_writes_its_study_plot_and_a_best_config_that_train_accepts(finished):
    path, spec, study = finished
    assert spec.output == path.parent / "sweep" and spec.study == "sweep"
    assert states(study) == [COMPLETE] * 3
    best_yaml, png = write_results(study, spec.output)
    assert (spec.output / "study.db").is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rows, best = summary(study)
    assert best["value"] == min(r["value"] for r in rows)
    assert {r["steps"] for r in rows} == {6} and all(r["seconds"] > 0 for r in rows)
    assert all(latest_checkpoint(spec.output / f"trial-{r['number']:04d}") is not None for r in rows)
    # the values of each trial differ (lr from a continuous range), and stay within it
    assert len({r["params"]["lr"] for r in rows}) == 3 and all(1e-3 <= r["params"]["lr"] <= 2e-2 for r in rows)
    cfg = build_train_config(spec.output / "again", config_file=best_yaml)
    assert cfg.lr == best["params"]["lr"] and cfg.batch_size == best["params"]["batch_size"]
    assert cfg.max_steps == 6 and cfg.model == BASE["model"]
    # the options a trial ran with are those best.yaml holds
    assert build_train_config(spec.output, options=study.trials[best["number"]].user_attrs["options"]) == cfg


def test_show_prints_the_trials_of_a_study(finished):
    path, spec, study = finished
    result = CliRunner().invoke(app, ["sweep", str(path), "--show"])
    assert result.exit_code == 0, result.output
    _, best = summary(study)
    for t in study.trials:
        assert f"{t.value:.4f}" in result.output
    assert f"best: trial {best['number']}" in result.output
    assert f"--config {spec.output / 'best.yaml'}" in result.output
    assert len(study.trials) == 3  # nothing ran


def test_a_second_run_continues_the_same_study(shake, tmp_path):
    spec = load_spec(sweep_file(tmp_path, shake, trials=2))
    first = [t.params for t in run_sweep(spec).trials]
    study = run_sweep(load_spec(tmp_path / "sweep.yaml"))
    assert optuna.study.get_all_study_names(spec.storage) == ["sweep"]
    assert states(study) == [COMPLETE] * 4
    assert sorted(p.name for p in spec.output.glob("trial-*")) == [f"trial-{n:04d}" for n in range(4)]
    # a resumed sampler does not draw the first run's values again
    assert [t.params for t in study.trials[2:]] != first


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for a trial as a process would
def test_a_trial_left_running_by_a_killed_process_is_failed_and_run_again(shake, tmp_path):
    spec = load_spec(sweep_file(tmp_path, shake, trials=1))
    study = open_study(spec)
    stale = study.ask()
    params = {d.key: d.suggest(stale) for d in spec.space}
    # the killed process had trained a little in its trial folder and sent heartbeats
    Trainer(shake, spec.output / "trial-0000", build_train_config(spec.output, options={**BASE, **params})).run(until_step=2)
    study._storage.record_heartbeat(stale._trial_id)
    with sqlite3.connect(spec.output / "study.db") as db:  # its last heartbeat, an hour ago
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    study = run_sweep(spec)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [FAIL, COMPLETE]
    retry = trials[1]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == params
    assert retry.user_attrs["run"] == str(spec.output / "trial-0001") and retry.user_attrs["steps"] == 6


def test_an_invalid_combination_fails_its_trial_and_the_sweep_goes_on(shake, tmp_path):
    spec = load_spec(sweep_file(tmp_path, shake, space={"block_size": [16, 64]}, trials=2))
    study = open_study(spec)
    study.enqueue_trial({"block_size": 64})  # beyond the model's context of 32
    study.enqueue_trial({"block_size": 16})
    study = run_sweep(spec)
    bad, good = study.get_trials(deepcopy=False)
    assert bad.state == FAIL and "block_size 64 exceeds the model's context (32)" in bad.user_attrs["error"]
    assert good.state == COMPLETE and summary(study)[1]["number"] == 1


def test_pruning_stops_a_trial_that_falls_behind(shake, tmp_path):
    path = sweep_file(tmp_path, shake, space={"lr": [1e-2, 1e-6]}, trials=2,
                      pruner={"name": "median", "startup_trials": 1})
    spec = load_spec(path)
    study = open_study(spec)
    study.enqueue_trial({"lr": 1e-2})  # learns; then a rate that cannot move the weights
    study.enqueue_trial({"lr": 1e-6})
    study = run_sweep(spec)
    good, bad = study.get_trials(deepcopy=False)
    assert good.state == COMPLETE and bad.state == PRUNED
    # both start from one seed and see the same batches: at the first evaluation the slow one is behind
    assert bad.user_attrs["steps"] == 3 < good.user_attrs["steps"] == 6
    assert min(bad.intermediate_values) == 5 and max(bad.intermediate_values) == 50  # percent of the budget
    assert bad.intermediate_values[50] > good.intermediate_values[50]
    assert "pruned" in CliRunner().invoke(app, ["sweep", str(path), "--show"]).output


def test_a_trial_is_not_pruned_at_the_end_of_its_budget(shake, tmp_path):
    # the threshold pruner would stop any trial; the only evaluation comes as the budget ends
    spec = load_spec(sweep_file(tmp_path, shake, base={**BASE, "eval_interval": 6}, trials=1,
                                pruner={"name": "threshold", "value": 0.0}))
    (trial,) = run_sweep(spec).get_trials(deepcopy=False)
    assert trial.state == COMPLETE and trial.user_attrs["steps"] == 6 and max(trial.intermediate_values) == 100


def test_ctrl_c_marks_the_trial_failed_queues_it_again_and_exits_130(shake, tmp_path, session_home):
    path = sweep_file(tmp_path, shake, base={**BASE, "max_steps": 100000, "eval_interval": 2}, trials=1)
    env = {**os.environ, "LLMOS_HOME": str(session_home)}
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "sweep", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    spec = load_spec(path)
    deadline = time.time() + 60
    while not list(spec.output.glob("trial-0000/step-*")):  # training has started
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped" in stderr
    trials = optuna.load_study(study_name="sweep", storage=spec.storage).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [FAIL, WAITING]
    assert trials[1].system_attrs["fixed_params"] == trials[0].params and trials[1].user_attrs["retry_of"] == 0


@pytest.mark.parametrize("change, words", [
    ({"space": {"lrr": [1e-3]}}, ["unknown option 'lrr'", "model.FIELD"]),
    ({"space": {"model.layers": [2]}}, ["unknown model field 'layers'", "n_layer"]),
    ({"space": {"lr": {"low": 1e-2, "high": 1e-3}}}, ["space lr", "empty", "swap"]),
    ({"space": {"batch_size": []}}, ["space batch_size", "empty"]),
    ({"space": {"lr": {"low": 0, "high": 1e-2, "log": True}}}, ["space lr", "log range needs low above 0"]),
    ({"space": {"lr": {"low": "small", "high": 1e-2}}}, ["space lr", "must be a number", "'small'"]),
    ({"space": {"lr": {"low": 1e-4, "high": 1e-2, "scale": "log"}}}, ["space lr", "unknown key(s) scale"]),
    ({"space": {"lr": [2.0, 5.0]}}, ["space lr", "no value can be used", "lr must be in (0, 1)"]),
    ({"base": {**BASE, "max_steps": 0}}, ["base:", "max_steps must be at least 1"]),
    ({"trails": 3}, ["unknown key(s) trails", "trials"]),
    ({"pruner": "sometimes"}, ["unknown pruner 'sometimes'", "median"]),
])
def test_a_bad_sweep_file_is_one_clear_line_and_exit_2(shake, tmp_path, change, words):
    path = sweep_file(tmp_path, shake, **change)
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert result.output.strip().count("\n") == 0 and line.startswith("error:")
    for word in words:
        assert word in line
    assert not (tmp_path / "sweep").exists()  # refused before any study or trial


def test_a_study_of_another_metric_is_refused(finished):
    path, spec, _ = finished
    doc = yaml.safe_load(path.read_text())
    other = path.with_name("other.yaml")
    other.write_text(yaml.safe_dump({**doc, "metric": "val_ppl", "output": "sweep"}))
    result = CliRunner().invoke(app, ["sweep", str(other)])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "another metric (val_loss, not val_ppl)" in line and "choose another study" in line
    other.write_text(yaml.safe_dump({**doc, "output": "sweep", "space": {"lr": [1e-3, 2e-3]}}))
    result = CliRunner().invoke(app, ["sweep", str(other)])
    assert result.exit_code == 2 and "another base or space" in " ".join(result.output.split())
