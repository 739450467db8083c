"""`llmos sweep`: a hyperparameter search over `llmos train`'s options, on Optuna.

A sweep is a YAML file (read with yaml.safe_load; relative paths are relative to its folder):

    data: data/shake            # a folder written by `llmos prepare`
    output: runs/sweep          # trial-0000/ ... (one run folder per trial), study.db, trials.png,
                                # best.yaml (default: the YAML's name without .yaml, beside it)
    base:                       # fixed options, exactly as in `llmos train --config` (a model: mapping too)
      preset: baby-gpt
      time_limit: 90s
      eval_interval: 100
    space:                      # searched: TrainConfig fields, or model.FIELD for model fields
      lr: {low: 1e-4, high: 1e-2, log: true}        # numbers: a float or an int range (by the option's type)
      batch_size: [8, 16, 32]                        # a list: one of these
      warmup_steps: {low: 0, high: 200, step: 50}
      model.n_layer: [4, 6]
    metric: val_loss            # a key of the evaluation's metrics: val_loss (default), val_ppl, ...
    direction: minimize         # or maximize
    trials: 20                  # trials run by this process (`llmos sweep --trials` overrides)
    timeout: 1h                 # optional: no trial starts after this long
    pruner: median              # median | hyperband | threshold | none, or {name: median, startup_trials: 3,
                                # warmup: 0.2}; threshold needs {name: threshold, value: 3.0}
    sampler: tpe                # tpe | random, or {name: tpe, startup_trials: 8, multivariate: true,
                                # constant_liar: true}: multivariate models the options jointly (a
                                # learning rate that suits one depth and not another); constant_liar
                                # keeps processes sharing a study from drawing the same point
    seed: 0                     # the sampler's
    study: shake                # the study's name (default: the output folder's name)
    storage: sqlite:///s.db     # optional database URL (PostgreSQL or MySQL for several machines);
                                # default: the SQLite file OUTPUT/study.db

Each trial trains in its own folder, OUTPUT/trial-NNNN, with `base` and the sampled values
merged the way `llmos train --config` merges a YAML file. Its value is the metric at the run's
last evaluation: what a run of these options ends with, and what a run of best.yaml is judged
on (with early_stop in `base`, the best evaluation: the checkpoint that run folder loads).

Pruners compare trials at the same share of their budget (max_steps, or time_limit when it is
set: the schedule follows the clock then), in steps of 5%: a trial's intermediate value at 35%
is the metric of its first evaluation at or past 35% of its budget. Trials that run at different
speeds are thus compared at the same wall time under a time limit; evaluate at least ten times
a trial (eval_interval) for the comparison to be close.

The study lives in a database, so a sweep resumes where it stopped and several processes, on
one machine or several, can work on one study. Each trial sends a heartbeat; a trial whose
process was killed is marked failed once its heartbeat is a minute old, and is run once more,
in a fresh folder. A trial stopped by Ctrl-C is marked failed and queued to run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from llmos.train.config import TrainConfig, TrainError, build_train_config, parse_duration

HEARTBEAT_S = 20  # a running trial's heartbeat interval, seconds
GRACE_S = 60  # a trial whose heartbeat is older than this belongs to a process that died
SHARES = 20  # intermediate values at 5%, 10%, ... 100% of a trial's budget
FAILS_BEFORE_STOP = 3  # a process whose first trials all fail (and none ever completed) stops
TOP_KEYS = ("data", "output", "base", "space", "metric", "direction", "trials", "timeout", "pruner", "sampler",
            "seed", "study", "storage")
RANGE_KEYS = ("low", "high", "log", "step")
PRUNERS = {"median": ("startup_trials", "warmup"), "hyperband": ("reduction_factor",),
           "threshold": ("value", "warmup"), "none": ()}
SAMPLERS = {"tpe": ("startup_trials", "multivariate", "constant_liar"), "random": ()}
FLAGS = {"multivariate", "constant_liar"}  # sampler options that are true or false


class SweepError(ValueError):
    """A sweep file, a search space or a study that cannot be used; the message says what to do."""


@dataclass
class Dimension:
    """One searched option: a list of choices, or a range of ints or floats."""

    key: str
    kind: str  # "choice", "int" or "float"
    choices: list = field(default_factory=list)
    low: float = 0
    high: float = 0
    log: bool = False
    step: float | None = None

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def values_to_check(self) -> list:
        """The values whose validity stands for the whole dimension's: every choice, or both ends."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def describe(self):
        if self.kind == "choice":
            return list(self.choices)
        d = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass
class SweepSpec:
    data: Path
    output: Path
    base: dict
    space: list[Dimension]
    metric: str = "val_loss"
    direction: str = "minimize"
    trials: int = 20
    timeout: float | None = None
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    seed: int | None = 0
    study: str = ""
    storage: str = ""

    def fingerprint(self) -> str:
        """What makes two runs one study's trials: the fixed options and the space (not the data's
        path, which differs between machines)."""
        text = json.dumps({"base": self.base, "space": {d.key: d.describe() for d in self.space}}, sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- reading a sweep file ----------------------------------------------------------------------


def _option_kinds() -> dict[str, str]:
    """Every searchable key -> 'int', 'float' or 'other' (by its dataclass field's type)."""
    from llmos.model import ModelConfig

    def kind(f):
        t = str(f.type)
        return "float" if "float" in t else "int" if "int" in t else "other"

    kinds = {f.name: kind(f) for f in fields(TrainConfig) if f.name != "model"}
    kinds.update({f"model.{f.name}": kind(f) for f in fields(ModelConfig)})
    return kinds


def _number(key: str, what: str, value, kind: str):
    """A bound or a choice as the option's type; YAML reads 1e-4 (no dot) as text, so text that
    reads as a number is one."""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"space {key}: {what} must be a number, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise SweepError(f"space {key}: {key} takes whole numbers, got {what} {value!r}")
        return int(value)
    return float(value)


def parse_dimension(key: str, spec, kinds: dict[str, str]) -> Dimension:
    if key not in kinds:
        if key.startswith("model."):
            model_fields = sorted(k[6:] for k in kinds if k.startswith("model."))
            raise SweepError(f"space: unknown model field {key[6:]!r} in {key!r}; model fields: {', '.join(model_fields)}")
        options = sorted(k for k in kinds if not k.startswith("model."))
        raise SweepError(f"space: unknown option {key!r}; search training options ({', '.join(options)}) or "
                         f"model.FIELD for a model field (e.g. model.n_layer)")
    kind = kinds[key]
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"space {key}: the list of choices is empty; give at least one value, e.g. [8, 16]")
        choices = []
        for value in spec:
            if kind in ("int", "float") and value is not None:
                value = _number(key, "a choice", value, kind)
            elif value is not None and not isinstance(value, (str, int, float, bool)):
                raise SweepError(f"space {key}: a choice must be a number, text, true/false or null, got {value!r}")
            choices.append(value)
        if len(set(map(repr, choices))) != len(choices):
            raise SweepError(f"space {key}: the choices {spec} repeat a value; list each once")
        return Dimension(key, "choice", choices=choices)
    if not isinstance(spec, dict):
        raise SweepError(f"space {key}: give a list of choices, e.g. [8, 16], or a range, e.g. {{low: 1e-4, high: 1e-2, "
                         f"log: true}}; a fixed value belongs in base")
    unknown = sorted(set(map(str, spec)) - set(RANGE_KEYS))
    if unknown:
        raise SweepError(f"space {key}: unknown key(s) {', '.join(unknown)} in the range; a range takes "
                         f"{', '.join(RANGE_KEYS)}")
    if kind == "other":
        raise SweepError(f"space {key}: {key} is not a number, so it cannot be a range; give a list of choices")
    for bound in ("low", "high"):
        if bound not in spec:
            raise SweepError(f"space {key}: the range needs low and high, e.g. {{low: 1e-4, high: 1e-2}}")
    low, high = _number(key, "low", spec["low"], kind), _number(key, "high", spec["high"], kind)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SweepError(f"space {key}: log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(key, "step", step, kind)
        if step <= 0:
            raise SweepError(f"space {key}: step must be above 0, got {step}")
        if log:
            raise SweepError(f"space {key}: a range takes log or step, not both")
    if low > high:
        raise SweepError(f"space {key}: the range is empty: low {low} is above high {high}; swap them")
    if low == high:
        raise SweepError(f"space {key}: low equals high ({low}): nothing to search; put {key} in base instead")
    if log and low <= 0:
        raise SweepError(f"space {key}: a log range needs low above 0, got {low}; raise low (e.g. {high / 100:g}) "
                         f"or drop log")
    if step is not None and step > high - low:
        raise SweepError(f"space {key}: step {step} is wider than the range {low}..{high}; use a smaller step")
    return Dimension(key, kind, low=low, high=high, log=log, step=step)


def _named(what: str, spec, table: dict[str, tuple]) -> dict:
    """`pruner: median` or `pruner: {name: median, startup_trials: 3}` -> {"name": ..., options}."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise SweepError(f"{what} must be one of {', '.join(table)}, or a mapping with name: and its options")
    name = spec["name"].lower()
    if name not in table:
        raise SweepError(f"unknown {what} {spec['name']!r}; use one of {', '.join(table)}")
    unknown = sorted(set(spec) - {"name", *table[name]})
    if unknown:
        takes = f"takes {', '.join(table[name])}" if table[name] else "takes no options"
        raise SweepError(f"{what} {name}: unknown option(s) {', '.join(unknown)}; it {takes}")
    out = {"name": name}
    for key in table[name]:
        if key in spec:
            value = spec[key]
            if key in FLAGS:
                if not isinstance(value, bool):
                    raise SweepError(f"{what} {name}: {key} must be true or false, got {value!r}")
                out[key] = value
                continue
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SweepError(f"{what} {name}: {key} must be a number, got {value!r}")
            out[key] = value
    if name == "threshold" and "value" not in out:
        raise SweepError("pruner threshold needs a value: {name: threshold, value: 3.0} prunes a trial whose metric "
                         "is worse than 3.0")
    for key in ("startup_trials",):
        if key in out and (out[key] < 0 or out[key] != int(out[key])):
            raise SweepError(f"{what} {name}: {key} must be a whole number, 0 or more, got {out[key]}")
    if "warmup" in out and not 0 <= out["warmup"] < 1:
        raise SweepError(f"{what} {name}: warmup is the share of a trial's budget before pruning starts, in [0, 1); "
                         f"got {out['warmup']}")
    if "reduction_factor" in out and (out["reduction_factor"] < 2 or out["reduction_factor"] != int(out["reduction_factor"])):
        raise SweepError(f"{what} {name}: reduction_factor must be a whole number, 2 or more")
    return out


def _coerce_base(base: dict, kinds: dict[str, str]) -> dict:
    """Numbers that YAML read as text (1e-4) become numbers, as in the space."""
    out = {}
    for key, value in base.items():
        if key != "time_limit" and kinds.get(key) in ("int", "float") and isinstance(value, str):
            try:
                value = _number(key, "the value", value, kinds[key])
            except SweepError:
                pass  # left as given: the options' own check names it
        out[key] = value
    model = base.get("model")
    if isinstance(model, dict):
        out["model"] = {k: _coerce_base({f"model.{k}": v}, kinds)[f"model.{k}"] for k, v in model.items()}
    return out


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; SweepError says what is wrong and what to do."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must hold a mapping with data:, base: and space: (see `llmos sweep --help`)")
    return parse_spec(raw, path.parent, path.with_suffix(""))


def parse_spec(raw: dict, folder: Path, default_output: Path) -> SweepSpec:
    unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"unknown key(s) {', '.join(unknown)} in the sweep file; it takes {', '.join(TOP_KEYS)} "
                         f"(training options go under base:)")
    if not raw.get("data"):
        raise SweepError("the sweep file needs data: a folder written by `llmos prepare`")
    data = folder / str(raw["data"])
    if not (data / "meta.json").is_file():
        raise SweepError(f"data: {data} is not a prepared dataset (no meta.json); run `llmos prepare ... -o {data}`")
    output = folder / str(raw["output"]) if raw.get("output") else default_output
    kinds = _option_kinds()
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError("base must be a mapping of training options, as in `llmos train --config`")
    base = _coerce_base(base, kinds)
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise SweepError("the sweep file needs space: a mapping of options to search, e.g. "
                         "space: {lr: {low: 1e-4, high: 1e-2, log: true}, batch_size: [8, 16]}")
    dims = [parse_dimension(str(key), value, kinds) for key, value in space.items()]
    metric = raw.get("metric", "val_loss")
    if not isinstance(metric, str) or not metric:
        raise SweepError(f"metric must name an evaluation metric, e.g. val_loss, got {metric!r}")
    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"direction must be minimize or maximize, got {direction!r}")
    trials = raw.get("trials", 20)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise SweepError(f"trials must be a whole number, 1 or more, got {trials!r}")
    timeout = raw.get("timeout")
    if timeout is not None:
        try:
            timeout = parse_duration(timeout)
        except TrainError as e:
            raise SweepError(f"timeout: {e}") from None
    seed = raw.get("seed", 0)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SweepError(f"seed must be a whole number (or null for a fresh one each run), got {seed!r}")
    spec = SweepSpec(data=data, output=output, base=base, space=dims, metric=metric, direction=direction,
                     trials=trials, timeout=timeout, pruner=_named("pruner", raw.get("pruner", "median"), PRUNERS),
                     sampler=_named("sampler", raw.get("sampler", "tpe"), SAMPLERS), seed=seed,
                     study=str(raw.get("study") or output.name), storage=_storage_url(raw.get("storage"), folder, output))
    check_space(spec)
    return spec


def _storage_url(url, folder: Path, output: Path) -> str:
    if not url:
        return f"sqlite:///{(output / 'study.db').resolve()}"
    url = str(url)
    if "://" not in url:
        raise SweepError(f"storage must be a database URL, e.g. sqlite:///sweep.db or postgresql://host/db, got {url!r}")
    if url.startswith("sqlite:///"):  # a relative SQLite path is relative to the sweep file, like data:
        rest = url[len("sqlite:///"):]
        if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
            return f"sqlite:///{(folder / rest).resolve()}"
    return url


# --- options of a trial ------------------------------------------------------------------------


def trial_options(base: dict, params: dict) -> dict:
    """base with the sampled values: model.X into the model: mapping."""
    options = {k: v for k, v in base.items() if k != "model"}
    model = dict(base.get("model") or {})
    for key, value in params.items():
        if key.startswith("model."):
            model[key[len("model."):]] = value
        else:
            options[key] = value
    if model:
        options["model"] = model
    return options


def check_options(options: dict, run_dir: Path | None = None) -> TrainConfig:
    """The TrainConfig of these options, or TrainError: what build_train_config checks, and the
    model they describe (sizes that divide, a context that holds block_size)."""
    try:
        cfg = build_train_config(run_dir or Path("."), options=dict(options))
    except TypeError as e:  # a value of the wrong type (text where a number belongs)
        raise TrainError(f"options: {e}") from None
    if not cfg.init_from:
        from llmos.model import ModelConfig

        try:
            mc = ModelConfig.from_name(cfg.preset, **cfg.model)
        except (TypeError, ValueError) as e:
            raise TrainError(f"model config: {e}") from None
        if cfg.block_size and cfg.block_size > mc.max_seq_len:
            raise TrainError(f"block_size {cfg.block_size} exceeds the model's context ({mc.max_seq_len}); raise "
                             f"model.max_seq_len in base")
    return cfg


def check_space(spec: SweepSpec):
    """Fail before any trial when base is invalid, or when no value of a dimension can be used
    (with the others at their first or their last values); the first error then says why."""
    first = {d.key: d.values_to_check()[0] for d in spec.space}
    last = {d.key: d.values_to_check()[-1] for d in spec.space}
    base_error = _error(spec.base)
    # a base may be incomplete on its own when the space fills in the rest (e.g. model.max_seq_len)
    if base_error and all(_error(trial_options(spec.base, others)) for others in (first, last)):
        raise SweepError(f"base: {base_error}")
    for d in spec.space:
        errors = [_error(trial_options(spec.base, {**others, d.key: value}))
                  for value in d.values_to_check() for others in (first, last)]
        if all(errors):
            raise SweepError(f"space {d.key}: no value can be used: {errors[0]}")


def _error(options: dict) -> str | None:
    try:
        check_options(options)
    except TrainError as e:
        return str(e)
    return None


# --- the study ---------------------------------------------------------------------------------


def _storage(url: str):
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # several processes wait their turn
    with warnings.catch_warnings():  # the heartbeat is marked experimental
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


def _pruner(spec: SweepSpec):
    import optuna

    p = spec.pruner
    warmup = int(round(p.get("warmup", 0) * 100))  # intermediate values are keyed by percent of the budget
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(p.get("startup_trials", 5)), n_warmup_steps=warmup)
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=100 // SHARES, max_resource=100,
                                              reduction_factor=int(p.get("reduction_factor", 3)))
    if p["name"] == "threshold":
        bound = {"upper" if spec.direction == "minimize" else "lower": float(p["value"])}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def _sampler(spec: SweepSpec, offset: int):
    """offset: trials the study already holds; a resumed or joining process draws afresh instead
    of repeating the first process's random draws."""
    import optuna

    seed = None if spec.seed is None else spec.seed + offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.sampler["name"] == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(spec.sampler.get("startup_trials", 10)),
                                          multivariate=spec.sampler.get("multivariate", False),
                                          constant_liar=spec.sampler.get("constant_liar", False))


def open_study(spec: SweepSpec, create: bool = True):
    """The spec's study, created on first use (create=False: SweepError when there is none). A
    study keeps its metric, direction and fingerprint; reopening it for another objective fails."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are reported through on_trial, not log lines
    if not create and spec.storage.startswith("sqlite:///") and not Path(spec.storage[len("sqlite:///"):]).exists():
        raise SweepError(f"no study yet: {spec.storage[len('sqlite:///'):]} does not exist; run `llmos sweep` without --show")
    if create:
        spec.output.mkdir(parents=True, exist_ok=True)
    try:
        storage = _storage(spec.storage)
    except Exception as e:  # a bad URL, a missing driver, a server that does not answer
        raise SweepError(f"cannot open the storage {spec.storage}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    names = set(optuna.study.get_all_study_names(storage))
    if spec.study not in names and not create:
        raise SweepError(f"no study {spec.study!r} in {spec.storage}; run `llmos sweep` without --show first")
    if spec.study not in names and list(spec.output.glob("trial-*")):
        raise SweepError(f"{spec.output} holds trial folders of another study; choose another output, or remove them")
    holds = len(storage.get_all_trials(storage.get_study_id_from_name(spec.study))) if spec.study in names else 0
    study = optuna.create_study(study_name=spec.study, storage=storage, direction=spec.direction,
                                load_if_exists=True, sampler=_sampler(spec, holds), pruner=_pruner(spec))
    mine = {"metric": spec.metric, "direction": spec.direction, "fingerprint": spec.fingerprint()}
    attrs = study.user_attrs
    if "metric" not in attrs:
        for key, value in {**mine, "base": spec.base, "space": {d.key: d.describe() for d in spec.space}}.items():
            study.set_user_attr(key, value)
        return study
    for key, what in (("metric", "metric"), ("direction", "direction"), ("fingerprint", "base or space")):
        if attrs.get(key) != mine[key]:
            theirs = attrs.get(key) if key != "fingerprint" else "other options"
            raise SweepError(f"study {spec.study!r} in {spec.storage} was made with another {what} ({theirs}, not "
                             f"{mine[key] if key != 'fingerprint' else 'these'}); choose another study: name or output "
                             f"for this objective")
    return study


def run_sweep(spec: SweepSpec, trials: int | None = None, timeout: float | None = None,
              on_trial: Callable[[dict, dict | None], None] | None = None,
              on_eval: Callable[[int, dict, float], None] | None = None):
    """Run trials (spec.trials, or `trials`) in this process and return the study.

    on_trial(row, best) is called as each trial ends (rows as in `summary`); on_eval(number,
    metrics, share) at each evaluation of a trial, share being the part of its budget spent.
    A trial whose options are invalid, or whose training fails (a loss that diverges), is
    marked failed with the reason and the sweep goes on. KeyboardInterrupt stops the sweep: the
    trial in progress is marked failed and queued to run again."""
    import optuna

    study = open_study(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # a killed process's trial, before the first new one
    history = {"failed": 0, "ran": 0}
    fatal: list[SweepError] = []  # what stops the whole sweep (a failing trial stops only itself)

    def objective(trial):
        params = {d.key: d.suggest(trial) for d in spec.space}
        try:
            return _run_trial(spec, study, trial, params, on_eval)
        except SweepError as e:
            fatal.append(e)
            study.stop()
            raise

    def after(study, frozen):
        history["ran"] += 1
        history["failed"] += frozen.state == optuna.trial.TrialState.FAIL
        if on_trial is not None:
            on_trial(trial_row(frozen), best_row(study))
        if (history["failed"] == history["ran"] == FAILS_BEFORE_STOP and not fatal
                and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))):
            fatal.append(SweepError(f"the first {FAILS_BEFORE_STOP} trials failed, the last with: "
                                    f"{frozen.user_attrs.get('error')}"))
            study.stop()

    study.optimize(objective, n_trials=trials or spec.trials, timeout=timeout if timeout is not None else spec.timeout,
                   catch=(Exception,), callbacks=[after], gc_after_trial=True)
    if fatal:
        raise fatal[0]
    return study


def _run_trial(spec: SweepSpec, study, trial, params: dict, on_eval) -> float:
    import optuna

    from llmos.train.trainer import Trainer

    run_dir = spec.output / f"trial-{trial.number:04d}"  # a retried trial has a new number, so a fresh folder
    options = trial_options(spec.base, params)
    for key, value in {"run": str(run_dir), "options": options, "steps": 0, "seconds": 0.0, "curve": [],
                       "error": None}.items():
        trial.set_user_attr(key, value)
    t0 = time.perf_counter()
    trainer = None
    state = {"share": 0, "curve": [], "reported": []}
    maximize = spec.direction == "maximize"

    def report(metrics: dict):
        share = trainer.progress()
        if on_eval is not None:
            on_eval(trial.number, metrics, share)
        if metrics["step"] == 0:  # the untrained model
            return
        value = _metric(spec, metrics)
        state["curve"].append([metrics["step"], value])
        state["reported"].append(value)
        trial.set_user_attr("curve", state["curve"])
        trial.set_user_attr("steps", trainer.step)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        if not math.isfinite(value):
            return
        reached = min(SHARES, int(share * SHARES + 1e-9))
        for mark in range(state["share"] + 1, reached + 1):
            trial.report(value, mark * 100 // SHARES)  # keyed by percent of the budget: 5, 10, ... 100
        if reached > state["share"]:
            state["share"] = reached
            if reached < SHARES and trial.should_prune():  # at the end of its budget a trial is complete
                raise optuna.TrialPruned(f"pruned at step {metrics['step']}: {spec.metric} {value:.4f}")

    try:
        cfg = check_options(options, run_dir)
        trainer = Trainer(spec.data, run_dir, cfg)
        trainer.on_eval = report
        final = trainer.run()
    except optuna.TrialPruned:
        raise
    except (TrainError, SweepError) as e:
        trial.set_user_attr("error", str(e))
        raise
    except Exception as e:  # a combination the trainer could not run: this trial fails, the sweep goes on
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        raise
    except KeyboardInterrupt:
        trial.set_user_attr("error", "stopped (Ctrl-C)")
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
        raise
    finally:
        if trainer is not None:
            trial.set_user_attr("steps", trainer.step)
            trainer.close()
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    if trainer.cfg.early_stop and state["reported"]:
        return (max if maximize else min)(state["reported"])
    return _metric(spec, final)


def _metric(spec: SweepSpec, metrics: dict) -> float:
    if spec.metric not in metrics:
        known = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"))
        raise SweepError(f"metric {spec.metric!r} is not among the evaluation's metrics ({known}); set metric: to "
                         f"one of them")
    return float(metrics[spec.metric])


# --- results -----------------------------------------------------------------------------------


def trial_row(t) -> dict:
    """A trial as a row: number, state, value (the objective; for a pruned trial, its last
    intermediate value under 'last'), params, steps, seconds, run folder and error."""
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    return {"number": t.number, "state": t.state.name, "value": t.value, "last": last, "params": dict(t.params),
            "steps": t.user_attrs.get("steps"), "seconds": t.user_attrs.get("seconds"), "run": t.user_attrs.get("run"),
            "error": t.user_attrs.get("error"), "retry_of": t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial"))}


def best_row(study) -> dict | None:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    pick = max if study.user_attrs.get("direction", "minimize") == "maximize" else min
    return trial_row(pick(done, key=lambda t: t.value))


def summary(study) -> tuple[list[dict], dict | None]:
    """(a row per trial, in order of number; the best completed trial's row or None)."""
    return [trial_row(t) for t in study.get_trials(deepcopy=False)], best_row(study)


def sorted_rows(rows: list[dict], direction: str) -> list[dict]:
    """Completed trials best first, then pruned ones by their last value, then the rest."""
    sign = -1 if direction == "maximize" else 1
    order = {"COMPLETE": 0, "PRUNED": 1}

    def key(r):
        v = r["value"] if r["state"] == "COMPLETE" else r["last"]
        return (order.get(r["state"], 2), sign * v if v is not None and math.isfinite(v) else math.inf, r["number"])

    return sorted(rows, key=key)


def best_options(study) -> dict:
    """The training options of the best completed trial (SweepError when none has completed)."""
    best = best_row(study)
    if best is None:
        raise SweepError(f"no trial of study {study.study_name!r} has completed yet; run more trials")
    known = {f.name for f in fields(TrainConfig)}
    options = trial_options(study.user_attrs.get("base", {}), best["params"])
    return {k: v for k, v in options.items() if k in known}


def write_best_config(study, path: str | Path) -> Path:
    """best.yaml: base and the best trial's values, as `llmos train --config` reads them."""
    import yaml

    best = best_row(study)
    options = best_options(study)
    metric = study.user_attrs.get("metric", "value")
    head = (f"# the best trial of study {study.study_name!r}: trial {best['number']}, {metric} {best['value']:.4f}\n"
            f"# use it with: llmos train DATA -o RUN --config {Path(path).name}\n")
    return _write_atomic(Path(path), (head + yaml.safe_dump(options, sort_keys=False)).encode())


def plot(study, path: str | Path) -> Path:
    """trials.png: the metric against the step in each trial (pruned trials dashed, grey), and
    each trial's value by number with the best so far."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, _ = summary(study)
    trials = study.get_trials(deepcopy=False)
    metric = study.user_attrs.get("metric", "value")
    maximize = study.user_attrs.get("direction") == "maximize"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    colors = plt.get_cmap("viridis")
    for t in trials:
        curve = t.user_attrs.get("curve") or []
        if not curve:
            continue
        steps, values = zip(*curve)
        if t.state.name == "COMPLETE":
            left.plot(steps, values, ".-", color=colors(t.number / max(len(trials) - 1, 1)), linewidth=1.2,
                      markersize=4, label=f"trial {t.number}")  # a dot: a trial evaluated once still shows
        else:
            left.plot(steps, values, ".--", color="0.6", linewidth=0.9, markersize=4)
    left.set_xlabel("step")
    left.set_ylabel(metric)
    left.set_title("each trial (pruned and failed: grey, dashed)")
    left.grid(alpha=0.3)
    if sum(t.state.name == "COMPLETE" for t in trials) <= 12:
        left.legend(fontsize=7)
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None and math.isfinite(r["value"])]
    stopped = [r for r in rows if r["state"] == "PRUNED" and r["last"] is not None]
    right.plot([r["number"] for r in done], [r["value"] for r in done], "o", color="C0", label="completed")
    right.plot([r["number"] for r in stopped], [r["last"] for r in stopped], "x", color="0.5",
               label="pruned (last value)")
    best, xs, ys = None, [], []
    for r in done:
        best = r["value"] if best is None else (max if maximize else min)(best, r["value"])
        xs.append(r["number"])
        ys.append(best)
    right.step(xs, ys, where="post", color="C3", label="best so far")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_xlabel("trial")
    right.set_ylabel(metric)
    right.set_title(f"study {study.study_name}")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return _write_atomic(Path(path), buf.getvalue())


def write_results(study, output: Path) -> tuple[Path | None, Path]:
    """best.yaml (None while no trial has completed) and trials.png in output."""
    best = write_best_config(study, output / "best.yaml") if best_row(study) else None
    return best, plot(study, output / "trials.png")


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def describe_params(params: dict[str, Any]) -> str:
    """lr=0.0031 batch_size=16: a trial's values on one line."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
