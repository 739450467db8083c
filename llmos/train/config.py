"""Training options: the TrainConfig dataclass and the one function that builds it from a YAML
file, flags, `--set` model fields and a resumed run's saved settings.

`llmos train` calls `build_train_config`; so can anything else that starts a run, and then
every face of LLMOS merges options the same way. No torch here: this module is cheap to import.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path


class TrainError(ValueError):
    """Bad options, an unusable dataset, or a run folder that belongs to another run."""


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # ModelConfig overrides, e.g. {"n_layer": 6}
    init_from: str | None = None  # start from a model's weights (fine-tuning)
    objective: str = "clm"  # "clm": next token; "mlm": masked tokens, bidirectional; "multitask", "dpo" (below)
    batch_size: int = 12
    block_size: int | None = None  # context length in training; default: the model's
    grad_accum: int = 1
    max_steps: int = 5000
    time_limit: float | None = None  # seconds
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for hidden matrices, AdamW for the rest
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dtype: str = "auto"  # "auto" (bf16 on GPUs that have it, fp32 on CPU), "fp32", "bf16"
    eval_interval: int = 250
    eval_iters: int = 20
    sample_tokens: int = 200
    log_interval: int = 10
    keep_checkpoints: int = 1
    seed: int = 1337
    mask_prob: float = 0.15
    # fine-tuning
    lora: int = 0  # LoRA rank; 0: every weight trains (full fine-tuning)
    lora_alpha: float | None = None  # None: 2 * rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["wqkv", "wo", "w13", "w2"])
    early_stop: int = 0  # stop after this many evaluations without a better validation loss (0: off)
    sharding: str = "ddp"  # under torchrun: "ddp" (a whole copy per process) or "fsdp" (weights and optimizer sharded)
    # the multi-task objective: lambda_lm * next token + lambda_cl * InfoNCE + lambda_task * labels
    lambda_lm: float = 1.0
    lambda_cl: float = 0.5
    lambda_task: float = 0.5
    tau: float = 0.1  # InfoNCE temperature
    projection_dim: int = 128  # the style embedding's size (the projection head's output)
    # direct preference optimization (train/dpo.py): pairs of a chosen and a rejected answer
    beta: float = 0.1  # how far the model may move from its reference (higher: less)
    sft_steps: int = 0  # first train this many steps on the chosen answers alone; the reference is the model then

    def validate(self):
        def check(ok, message):
            if not ok:
                raise TrainError(message)

        check(self.objective in ("clm", "mlm", "multitask", "dpo"),
              f"objective must be 'clm', 'mlm', 'multitask' or 'dpo', got {self.objective!r}")
        if self.objective == "dpo":
            check(bool(self.init_from), "--objective dpo adapts a trained model to preferences: give --init-from "
                                        "MODEL (or use `llmos finetune --dpo -m MODEL`)")
            check(0 < self.beta <= 100, f"beta must be in (0, 100], got {self.beta}")
            check(0 <= self.sft_steps < self.max_steps,
                  f"sft_steps must be 0 or more and below max_steps ({self.max_steps}), got {self.sft_steps}")
        if self.objective == "multitask":
            for name in ("lambda_lm", "lambda_cl", "lambda_task"):
                check(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)}")
            check(self.lambda_lm + self.lambda_cl + self.lambda_task > 0, "the lambdas cannot all be 0")
            check(0 < self.tau <= 10, f"tau must be in (0, 10], got {self.tau}")
            check(self.projection_dim >= 1, f"projection_dim must be at least 1, got {self.projection_dim}")
            check(self.batch_size >= 4 and self.batch_size % 2 == 0,
                  f"--objective multitask takes rows in pairs (two passages of one source): batch_size must be "
                  f"even and at least 4, got {self.batch_size}")
        check(self.optimizer in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        check(self.sharding in ("ddp", "fsdp"), f"sharding must be 'ddp' or 'fsdp', got {self.sharding!r}")
        check(not (self.sharding == "fsdp" and self.optimizer == "muon"),
              "--sharding fsdp shards each matrix, which Muon orthogonalizes whole: use --optimizer adamw")
        check(self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval", "keep_checkpoints"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(self.block_size is None or self.block_size >= 2, f"block_size must be at least 2, got {self.block_size}")
        check(self.lora >= 0, f"lora (the rank) must be 0 (off) or more, got {self.lora}")
        check(not (self.lora and not self.init_from), "--lora adapts a pretrained model: give --init-from MODEL "
                                                      "(or use `llmos finetune -m MODEL`)")
        check(not (self.lora and self.optimizer == "muon"), "--optimizer muon orthogonalizes whole matrices; "
                                                             "with --lora use adamw")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.early_stop >= 0, f"early_stop must be 0 (off) or more, got {self.early_stop}")
        check(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        check(self.min_lr is None or 0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.weight_decay < 1, f"weight_decay must be in [0, 1), got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 turns it off), got {self.grad_clip}")
        check(self.time_limit is None or self.time_limit > 0, f"time_limit must be positive, got {self.time_limit}")
        check(0 < self.mask_prob < 1, f"mask_prob must be in (0, 1), got {self.mask_prob}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise TrainError(f"unknown training option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        d = dict(d)
        for name, value in d.items():  # YAML reads 1e-4 (no dot) as text: a number written so is still one
            kind = known[name].split(" |")[0]
            if kind in ("float", "int") and isinstance(value, str) and name != "time_limit":
                try:
                    d[name] = float(value) if kind == "float" else int(value)
                except ValueError:
                    raise TrainError(f"{name} must be a number, got {value!r}") from None
        return cls(**d)


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise TrainError(f"cannot read duration {text!r}: use e.g. 90s, 5m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_model_overrides(pairs: list[str]) -> dict:
    """`--set FIELD=VALUE` pairs -> model field overrides; a value is read as JSON when it can be."""
    from llmos.model import ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise TrainError(f"--set takes FIELD=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        if key not in known:
            raise TrainError(f"unknown model field {key!r}; fields: {', '.join(sorted(known))}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def saved_train_config(run_dir: Path) -> dict:
    """The training options saved in a run folder's latest checkpoint ({} when it has none)."""
    from llmos.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return {}
    return json.loads((ckpt / "config.json").read_text()).get("train", {})


# Fine-tuning starts from a trained model: a lower learning rate than pretraining (higher for an
# adapter, whose update starts at zero), a short warmup, frequent evaluation, the held-out loss
# deciding when to stop. Under everything a user gives (YAML, flags, --set).
FINETUNE_DEFAULTS = {
    "full": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10, "batch_size": 4, "block_size": 256, "max_steps": 500,
             "eval_interval": 25, "eval_iters": 10, "weight_decay": 0.0, "log_interval": 1},
    "lora": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "batch_size": 4, "block_size": 256, "max_steps": 500,
             "eval_interval": 25, "eval_iters": 10, "weight_decay": 0.0, "log_interval": 1},
}
# Preference training moves a model less and more carefully than imitation: lower rates, and
# evaluation on held-out pairs (eval_iters x batch_size of them).
FINETUNE_DEFAULTS["dpo-full"] = {**FINETUNE_DEFAULTS["full"], "objective": "dpo", "lr": 1e-5, "min_lr": 1e-6,
                                 "max_steps": 200, "eval_interval": 25, "eval_iters": 16, "sample_tokens": 48}
FINETUNE_DEFAULTS["dpo-lora"] = {**FINETUNE_DEFAULTS["lora"], "objective": "dpo", "lr": 5e-4, "min_lr": 5e-5,
                                 "max_steps": 200, "eval_interval": 25, "eval_iters": 16, "sample_tokens": 48}


def build_train_config(output: Path, *, config_file: Path | None = None, flags: dict | None = None,
                       set_pairs: list[str] = (), resume: bool = False, options: dict | None = None,
                       defaults: dict | None = None) -> TrainConfig:
    """The options of a run, merged in one order: defaults < YAML file (or `options`, the same
    mapping already parsed: an HTTP request's) < flags < `--set` (for model fields). flags maps
    TrainConfig fields to values, None meaning "not given"; a time_limit given as text ('5m') is
    read as a duration. Resuming the run in output with no options that define a model (preset,
    config file, --set, init_from, objective) reuses its saved options; only max_steps and
    time_limit may change then. `defaults` sit under all of these (fine-tuning's). Raises
    TrainError with a message for the user."""
    values: dict = dict(defaults or {})
    if options is not None:
        if not isinstance(options, dict):
            raise TrainError("training options must be a mapping of option names to values")
        values.update(options)
        config_file = None
    if config_file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TrainError(f"cannot read {config_file}: {e}") from None
        if not isinstance(loaded, dict):
            raise TrainError(f"{config_file} must hold a mapping of training options")
        values.update(loaded)
    from_file = values.pop("model", None) or {}
    if not isinstance(from_file, dict):
        raise TrainError(f"{config_file or 'options'}: 'model' must be a mapping of model fields, e.g. model: {{n_layer: 6}}")
    model_over = {**from_file, **parse_model_overrides(list(set_pairs))}
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values.update(flags)
    if isinstance(values.get("time_limit"), str):
        values["time_limit"] = parse_duration(values["time_limit"])
    defines_model = any(flags.get(k) for k in ("preset", "init_from", "objective")) or config_file or options or set_pairs
    if resume and Path(output).exists() and not defines_model:
        kept = {k: v for k, v in values.items() if k in ("max_steps", "time_limit")}
        values = {**saved_train_config(Path(output)), **kept}
        model_over = values.pop("model", {})
    if model_over:
        from llmos.model import ModelConfig

        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(model_over) - known)
        if unknown:
            raise TrainError(f"unknown model field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
    cfg = TrainConfig.from_dict({**values, "model": model_over})
    cfg.validate()
    return cfg
