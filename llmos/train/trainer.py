"""`llmos train`: the one training loop, for causal LM (default), masked LM, multi-task and
preference (DPO, train/dpo.py) objectives.

AdamW (weight decay on matrices and embeddings only), or Muon for the hidden matrices (see
optim.py), linear warmup then cosine decay,
gradient clipping and accumulation, optional bfloat16 autocast, periodic validation with
perplexity and samples, `--time-limit` and `--max-steps`. Runs unchanged under `torchrun`
(DistributedDataParallel: gloo on CPU, nccl on GPU; rank 0 logs and saves).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmos.model import ModelConfig, Transformer
from llmos.train.checkpoint import (CheckpointError, checkpoint_name, latest_checkpoint, load_train_state, mark_best,
                                     save_checkpoint)
from llmos.train.config import TrainConfig, TrainError  # TrainConfig is also imported from here
from llmos.train.data import TokenData
from llmos.train.optim import Muon, Optimizers


# --- distributed -----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # the processes of one machine share its cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend=backend)
    return Dist(rank, world, local, device)


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


# --- the model, optimizer and schedule -------------------------------------------------------


def build_model_config(cfg: TrainConfig, data: TokenData) -> tuple[ModelConfig, dict | None]:
    """The model to train: a preset with overrides, or the config of --init-from's model."""
    if cfg.init_from:
        from llmos.weights import store as models

        try:
            path = models.resolve(cfg.init_from)
        except models.ModelError as e:
            raise TrainError(str(e)) from None
        meta = json.loads((path / "config.json").read_text())
        if cfg.lora and meta.get("adapter"):
            raise TrainError(f"--init-from {cfg.init_from} is an adapter: merge it first (`llmos merge`) to adapt it again")
        mc = ModelConfig.from_dict({**meta["model"], **cfg.model})
        if mc.vocab_size != data.vocab_size:
            raise TrainError(
                f"--init-from {cfg.init_from} has a vocabulary of {mc.vocab_size} but the dataset's is "
                f"{data.vocab_size}: prepare the data with --tokenizer {cfg.init_from}"
            )
        return mc, {"path": str(path), "meta": meta}
    try:
        mc = ModelConfig.from_name(cfg.preset, **{**cfg.model, "vocab_size": data.vocab_size})
    except (TypeError, ValueError) as e:
        raise TrainError(f"model config: {e}") from None
    if cfg.objective == "mlm":
        mc.causal = False
    return mc, None


def configure_optimizer(model: Transformer, cfg: TrainConfig, device) -> torch.optim.Optimizer | Optimizers:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden = {}
    if cfg.optimizer == "muon":
        hidden = {name: p for name, p in params.items()
                  if p.dim() == 2 and name.removeprefix("model.").startswith("blocks.")}
    rest = [p for name, p in params.items() if name not in hidden]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel exists for CPU and CUDA; it replaces a Python loop over parameters.
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    if not hidden:
        return adamw
    c = model.config if hasattr(model, "config") else model.model.config  # a Transformer, or with heads
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    # Fused projections are orthogonalized matrix by matrix: q, k, v; gate and up.
    splits = {p: [q, kv, kv] if name.endswith("wqkv.weight") else [c.d_ff] * (2 if c.gated else 1)
              for name, p in hidden.items() if name.endswith(("wqkv.weight", "w13.weight"))}
    muon = Muon(list(hidden.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, splits=splits)
    return Optimizers(muon, adamw)


def learning_rate(cfg: TrainConfig, progress: float, step: int) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr as progress goes 0 -> 1."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def mask_tokens(x: torch.Tensor, mask_id: int, vocab: int, prob: float, generator: torch.Generator):
    """BERT's recipe: choose prob of the positions; of those 80% become the mask token, 10% a
    random token, 10% stay. Targets are the original tokens there and -100 elsewhere."""
    chosen = torch.rand(x.shape, generator=generator) < prob
    targets = torch.where(chosen, x, torch.full_like(x, -100))
    r = torch.rand(x.shape, generator=generator)
    inputs = torch.where(chosen & (r < 0.8), torch.full_like(x, mask_id), x)
    random_tokens = torch.randint(vocab, x.shape, generator=generator)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_tokens, inputs)
    return inputs, targets


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the targets that count (not -100); 0 for a batch with none (a packed
    row of prompts only), where the mean would be 0/0."""
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


@torch.no_grad()
def heldout_loss(model: Transformer, data: TokenData, split: str = "val", block: int = 256, batch: int = 4,
                 max_tokens: int | None = None) -> dict:
    """The loss over a whole split (or its first max_tokens), in consecutive windows: every token
    predicted once, from the window it falls in; instruction data counts the assistant's tokens
    only. Unlike the trainer's sampled estimate, the same number for every model on the data."""
    model.eval()
    total, count = 0.0, 0
    if data.instruction:
        ids, mask, starts = data.examples[split]
        ends = list(starts[1:]) + [len(ids)]
        rows = [(int(s), int(e)) for s, e in zip(starts, ends) if e - s >= 2]
        for s, e in rows:
            window = torch.from_numpy(np.asarray(ids[s : min(e, s + block + 1)], dtype=np.int64))[None]
            y = torch.where(torch.from_numpy(np.asarray(mask[s + 1 : s + window.shape[1]], dtype=np.int64))[None] > 0,
                            window[:, 1:], torch.full_like(window[:, 1:], -100))
            logits = model(window[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                           reduction="sum"))
            count += int((y != -100).sum())
    else:
        for array in data.shards[split]:
            n = len(array) if max_tokens is None else min(len(array), max_tokens - count)
            windows = [(o, min(o + block, n - 1)) for o in range(0, n - 1, block)]
            for k in range(0, len(windows), batch):
                chunk = windows[k : k + batch]
                width = max(e - o for o, e in chunk)
                x = torch.zeros(len(chunk), width, dtype=torch.long)
                y = torch.full((len(chunk), width), -100, dtype=torch.long)
                for r, (o, e) in enumerate(chunk):
                    w = torch.from_numpy(np.asarray(array[o : e + 1], dtype=np.int64))
                    x[r, : e - o], y[r, : e - o] = w[:-1], w[1:]
                logits = model(x)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                               reduction="sum"))
                count += int((y != -100).sum())
            if max_tokens is not None and count >= max_tokens:
                break
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count}


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # measured slower on CPUs without native bfloat16 (docs/benchmarks.md)


# --- the loop --------------------------------------------------------------------------------


class Trainer:
    def __init__(self, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False,
                 on_log=None, on_eval=None):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out_dir)
        self.d = setup_distributed()
        self.on_log, self.on_eval = on_log or (lambda m: None), on_eval or (lambda m: None)
        self.on_status = lambda message: None  # a line about work outside the steps (the DPO reference)
        self.dpo = cfg.objective == "dpo"
        try:
            if self.dpo:
                from llmos.train.dpo import PairData

                self.data = PairData(data_dir)
            else:
                self.data = TokenData(data_dir)
        except Exception as e:
            raise TrainError(str(e)) from None
        self.checkpoint = None
        try:
            self.checkpoint = latest_checkpoint(self.out)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        if self.checkpoint is not None and not resume:
            raise TrainError(f"{self.out} already holds a training run ({self.checkpoint.name}); "
                             f"pass --resume to continue it, or choose another -o folder")
        if self.checkpoint is not None:
            saved = json.loads((self.checkpoint / "config.json").read_text())
            self._check_same_run(saved)
        self.model_config, self.init = build_model_config(cfg, self.data)
        if cfg.objective == "mlm" and self.data.meta.get("mask_id") is None:
            raise TrainError("--objective mlm needs a mask token: prepare the data with --tokenizer char or bpe")
        self.block = cfg.block_size or self.model_config.max_seq_len
        if self.block > self.model_config.max_seq_len:
            raise TrainError(f"block_size {self.block} exceeds the model's context ({self.model_config.max_seq_len})")
        for split in ("train", "val"):
            try:
                self.data.check(split, self.block)
            except Exception as e:
                raise TrainError(str(e)) from None
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.model_config).to(self.d.device)
        if self.init is not None:
            from llmos.weights.store import ModelError, load_weights

            try:
                state = load_weights(Path(self.init["path"]), self.init["meta"])
            except ModelError as e:
                raise TrainError(str(e)) from None
            if self.model_config.tie_embeddings:
                state["lm_head.weight"] = state["embed.weight"]
            self.model.load_state_dict(state)
        self.lora = None
        if cfg.lora:
            from llmos.train.lora import AdapterError, LoRAConfig, apply_lora

            try:
                self.lora = LoRAConfig(cfg.lora, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets))
                apply_lora(self.model, self.lora)
            except AdapterError as e:
                raise TrainError(str(e)) from None
            self.model.to(self.d.device)
        self.heads, self.net = None, self.model
        if cfg.objective == "multitask":
            from llmos.train.multitask import Heads, MultitaskNet

            for split in ("train", "val"):
                try:
                    self.data.check_pairs(split)
                except Exception as e:
                    raise TrainError(str(e)) from None
            torch.manual_seed(cfg.seed + 4)
            self.heads = Heads(self.model_config.d_model, cfg.projection_dim, self.data.labels).to(self.d.device)
            self.net = MultitaskNet(self.model, self.heads)
        if self.checkpoint is not None:
            self._restore_weights()
        # FSDP: each block's parameters (and the rest, at the root) sharded across the processes,
        # gathered for a block's forward and backward; the optimizer then holds only its shard.
        self.fsdp = cfg.sharding == "fsdp" and self.d.enabled
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.net)
        self.optimizer = configure_optimizer(self.net, cfg, self.d.device)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.best_val = float("inf")
        self.best_checkpoint: str | None = None  # under early stopping
        self.evals_without_gain = 0
        self.tensorboard = None
        if self.checkpoint is not None:
            self._restore_state()
        self.reference = None  # DPO: the reference model's log-probabilities of every pair
        if self.dpo:
            from llmos.train.dpo import load_reference

            self.reference = load_reference(self.out, self._reference_stamp())
            if self.reference is None and self.step > cfg.sft_steps:
                raise TrainError(f"{self.out} lost its reference log-probabilities (reference/); they cannot be "
                                 f"computed again from a trained model: start the run afresh in another folder")
        self.ddp = self.net
        if self.d.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.net, device_ids=[self.d.local_rank] if self.d.device.type == "cuda" else None)
        self.amp = autocast_dtype(cfg, self.d.device)

    def _check_same_run(self, saved: dict):
        train = saved.get("train", {})
        mine = asdict(self.cfg)
        for key in ("preset", "model", "objective", "init_from", "block_size", "seed", "batch_size", "grad_accum",
                    "optimizer", "lora", "projection_dim", "sharding", "beta", "sft_steps"):
            if key in train and train[key] != mine[key]:
                raise TrainError(
                    f"{self.out} holds a run with {key}={train[key]!r}, not {mine[key]!r}; resume it with its "
                    f"own settings, or choose another -o folder"
                )
        if saved.get("data", {}).get("vocab_size") not in (None, self.data.vocab_size):
            raise TrainError(f"{self.out} was trained on a dataset with another vocabulary; use the same data")

    def _restore_weights(self):
        from safetensors.torch import load_file

        if self.lora is not None:  # the base came from --init-from; the checkpoint holds the adapter
            adapter = load_file(str(self.checkpoint / "adapter.safetensors"))
            expected = {name for name, _ in self.model.named_parameters() if ".lora_" in name}
            if set(adapter) != expected:
                raise TrainError(f"{self.checkpoint} holds another adapter than this run's LoRA settings")
            self.model.load_state_dict(adapter, strict=False)
        else:
            state = load_file(str(self.checkpoint / "model.safetensors"))
            if self.model_config.tie_embeddings:
                state["lm_head.weight"] = state["embed.weight"]
            self.model.load_state_dict(state)
        if self.heads is not None:
            from llmos.train.multitask import HEADS_FILE

            try:
                self.heads.load_state_dict(load_file(str(self.checkpoint / HEADS_FILE)))
            except Exception as e:
                raise TrainError(f"{self.checkpoint}: its heads do not fit this run ({type(e).__name__}: {e})") from None

    def _restore_state(self):
        ts = load_train_state(self.checkpoint)
        by_name = any(isinstance(k, str) for k in ts["optimizer"].get("state", {}))  # written under FSDP
        if self.fsdp or by_name:  # saved whole, keyed by parameter name; each process takes its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            if isinstance(self.optimizer, Optimizers) or (self.fsdp and ts["optimizer"].get("state") and not by_name):
                raise TrainError(f"{self.checkpoint} holds optimizer state in another layout than this run's; "
                                 f"resume with the --sharding it was saved with")
            set_optimizer_state_dict(self.net, self.optimizer, optim_state_dict=ts["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(ts["optimizer"])
        self.step, self.tokens_seen = int(ts["step"]), int(ts["tokens_seen"])
        self.elapsed_before, self.best_val = float(ts["elapsed_s"]), float(ts["best_val"])
        self.best_checkpoint = ts.get("best_checkpoint") or None
        self.evals_without_gain = int(ts.get("evals_without_gain", 0))
        self.data_gen.set_state(ts["data_rng"])
        self.mask_gen.set_state(ts["mask_rng"])
        torch.set_rng_state(ts["torch_rng"])

    # -- pieces of a step --

    def _batch(self, split: str, batch_size: int, generator: torch.Generator, rows: slice | None):
        """(inputs, targets, extra): random windows (extra None), packed examples for instruction
        data (extra: segments), or pairs of passages for the multi-task objective (extra:
        lengths and labels)."""
        if self.heads is not None:
            x, y, lengths, groups, labels = self.data.pair_batch(split, batch_size, self.block, generator, rows)
            return x, y, (lengths, labels, groups)
        if self.dpo:  # extra: which pairs (their reference log-probabilities)
            which = self.data.draw(split, batch_size, generator, rows)
            x, y = self.data.batch(split, which, self.block)
            return x, y, which
        if self.data.instruction:
            return self.data.packed_batch(split, batch_size, self.block, generator, rows)
        x, y = self.data.batch(split, batch_size, self.block, generator, rows)
        return x, y, None

    def _multitask(self, net, x, y, extra) -> dict[str, torch.Tensor]:
        from llmos.train.multitask import multitask_losses

        lengths, labels, groups = (t.to(self.d.device) for t in extra)
        c = self.cfg
        with torch.autocast(self.d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return multitask_losses(net, x.to(self.d.device), y.to(self.d.device), lengths, labels, groups,
                                    (c.lambda_lm, c.lambda_cl, c.lambda_task), c.tau, mean_loss, self.d.enabled)

    def _loss(self, x, y, segments=None):
        if self.heads is not None:
            terms = self._multitask(self.ddp, x, y, segments)
            for key, value in terms.items():
                if key != "loss":
                    self.term_sums[key] = self.term_sums.get(key, 0.0) + float(value.detach()) / self.cfg.grad_accum
            return terms["loss"]
        if self.dpo:
            return self._dpo_loss(x, y, segments)
        if self.cfg.objective == "mlm":
            x, y = mask_tokens(x, self.data.meta["mask_id"], self.data.vocab_size, self.cfg.mask_prob, self.mask_gen)
        x, y = x.to(self.d.device), y.to(self.d.device)
        kwargs = {"segments": segments.to(self.d.device)} if segments is not None else {}
        with torch.autocast(self.d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.ddp(x, **kwargs)
        return mean_loss(logits, y)

    def _dpo_loss(self, x, y, which):
        from llmos.train.dpo import dpo_terms, sequence_logps

        b = len(which)
        with torch.autocast(self.d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if self.step < self.cfg.sft_steps:  # first the chosen answers alone, as supervised fine-tuning
                return mean_loss(self.ddp(x[:b].to(self.d.device)), y[:b].to(self.d.device))
            logps, _ = sequence_logps(self.ddp, x.to(self.d.device), y.to(self.d.device))
        ref = torch.from_numpy(self.reference["train"][which]).to(logps)
        terms = dpo_terms(logps, torch.cat([ref[:, 0], ref[:, 1]]), self.cfg.beta)
        for key in ("margin", "pref_acc"):
            self.term_sums[key] = self.term_sums.get(key, 0.0) + float(terms[key].detach()) / self.cfg.grad_accum
        return terms["loss"]

    def _reference_stamp(self) -> dict:
        return {"data": str(self.data.path.resolve()), "pairs": [self.data.pairs("train"), self.data.pairs("val")],
                "block": self.block, "init_from": self.cfg.init_from, "after_step": self.cfg.sft_steps}

    def _ensure_reference(self):
        """DPO: the reference's log-probabilities, computed once when the DPO steps begin."""
        if not self.dpo or self.reference is not None or self.step < self.cfg.sft_steps:
            return
        from llmos.train.dpo import reference_logps, save_reference

        total = self.data.pairs("train") + self.data.pairs("val")
        self.on_status(f"reference: log-probabilities of {total} pairs under the model at step {self.step}, once")
        t0 = time.perf_counter()
        self.reference = reference_logps(self.model, self.data, self.block, self.cfg.batch_size)
        if self.d.main:
            save_reference(self.out, self.reference, self._reference_stamp())
            self._log({"step": self.step, "reference_pairs": total, "reference_s": time.perf_counter() - t0})

    def _rows(self) -> slice:
        B = self.cfg.batch_size
        return slice(self.d.rank * B, (self.d.rank + 1) * B)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.dpo:
            return self._evaluate_dpo()
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)  # the same batches every evaluation
        mask_gen = torch.Generator().manual_seed(self.cfg.seed + 3)
        out = {}
        for split in ("train", "val"):
            losses, terms = [], {}
            for _ in range(self.cfg.eval_iters):
                x, y, segments = self._batch(split, self.cfg.batch_size * self.d.world, gen, self._rows())
                if self.heads is not None:  # the LM term is the loss that early stopping and perplexity watch
                    t = self._multitask(self.net, x, y, segments)
                    losses.append(t["lm_loss"])
                    for key in ("cl_loss", "cl_acc", "task_loss", "task_acc"):
                        if key in t:
                            terms.setdefault(key, []).append(t[key])
                    continue
                if self.cfg.objective == "mlm":
                    x, y = mask_tokens(x, self.data.meta["mask_id"], self.data.vocab_size, self.cfg.mask_prob, mask_gen)
                kwargs = {"segments": segments.to(self.d.device)} if segments is not None else {}
                logits = self.model(x.to(self.d.device), **kwargs)
                losses.append(mean_loss(logits, y.to(self.d.device)))
            out[f"{split}_loss"] = float(all_reduce_mean(torch.stack(losses).mean(), self.d))
            for key, values in terms.items():
                out[f"{split}_{key}"] = float(all_reduce_mean(torch.stack(values).mean(), self.d))
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
        self.model.train()
        return out

    @torch.no_grad()
    def _evaluate_dpo(self) -> dict:
        """Held-out pairs (and as many training pairs): the loss watched (DPO's once a reference
        exists, before it the chosen answers' language-model loss) and train/dpo.py's measures."""
        from llmos.train.dpo import evaluate

        self.model.eval()
        out = {}
        cap = min(self.cfg.eval_iters * self.cfg.batch_size, self.data.pairs("val"))  # as many of each split
        for split in ("train", "val"):
            m = evaluate(self.model, self.data, split, self.block, self.cfg.beta, self.reference, cap,
                         self.cfg.batch_size)
            out.update({f"{split}_{k}": v for k, v in m.items()})
            out[f"{split}_loss"] = m["loss"] if "loss" in m else m["chosen_nll"]
        out["val_ppl"] = math.exp(min(out["val_chosen_nll"], 50))
        self.model.train()
        return out

    def sample(self) -> str | None:
        if self.cfg.objective == "mlm" or self.fsdp:  # sharded weights: generation would need every process
            return None
        from llmos.engine.generate import generate
        from llmos.engine.sampling import SamplingParams
        from llmos.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(self.data.path, {"tokenizer": self.data.meta["tokenizer"]})
        prompt = self.data.sample_prompt()[-(self.model_config.max_seq_len // 2):]  # room to write, in a small context
        self.model.eval()
        n = min(self.cfg.sample_tokens, self.model_config.max_seq_len - len(prompt))
        seq = generate(self.model, prompt, SamplingParams(temperature=0.8, top_k=50, max_tokens=n, seed=0))[0]
        self.model.train()
        return tok.decode(prompt, skip_special=False) + tok.decode(seq.output, skip_special=False)

    def _full_states(self) -> tuple[dict, dict | None, dict]:
        """(model state, heads state, optimizer state), whole. Under FSDP every process takes
        part in gathering them and the first one receives them."""
        if not self.fsdp:
            return (self.model.state_dict(), self.heads.state_dict() if self.heads is not None else None,
                    self.optimizer.state_dict())
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.net, options=whole)
        optimizer = get_optimizer_state_dict(self.net, self.optimizer, options=whole)
        heads = None
        if self.heads is not None:
            heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return state, heads, optimizer

    def save(self):
        self.saved_step = self.step  # the same on every process
        if self.heads is not None:  # the corpus's place in the style embedding (every process: a forward)
            from llmos.train.multitask import corpus_centroid

            self.heads.centroid.copy_(corpus_centroid(self.net, self.data, self.block, seed=self.cfg.seed))
        model_state, heads_state, optimizer_state = self._full_states()
        if not self.d.main:
            return None
        tok_meta = self.data.meta["tokenizer"]
        config = {
            "model": self.model_config.to_dict(),
            "name": self.out.name,
            "license": (self.init or {}).get("meta", {}).get("license", "as the training data"),
            "description": f"trained with llmos train on {self.data.path}",
            "source": str(self.data.path),
            "tokenizer": {k: tok_meta.get(k) for k in ("bos_token", "eos_token", "add_bos_token", "stop_tokens", "mask_token")},
            "prompt_style": self.data.meta.get("prompt_style") or {"kind": "completion", "chat_template": None},
            "generation": (self.init or {}).get("meta", {}).get("generation") or {"temperature": 0.8, "top_k": 50, "max_tokens": 256},
            "train": asdict(self.cfg),
            "data": {"path": str(self.data.path), "vocab_size": self.data.vocab_size},
            "step": self.step,
        }
        weights, weights_file = model_state, "model.safetensors"
        if self.lora is not None:  # only the adapter, and which base it adapts
            from llmos.train.lora import adapter_state
            from llmos.weights.store import weights_sha256

            base = Path(self.init["path"])
            config["adapter"] = {**self.lora.to_dict(), "base": {
                "name": self.init["meta"].get("name", base.name), "path": str(base.resolve()),
                "sha256": weights_sha256(base)}}
            config["description"] = f"LoRA rank {self.lora.rank} on {config['adapter']['base']['name']}, " \
                                    f"trained with llmos on {self.data.path}"
            weights, weights_file = adapter_state(model_state), "adapter.safetensors"
        train_state = {
            "optimizer": optimizer_state,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t0),
            "best_val": self.best_val,
            "data_rng": self.data_gen.get_state(),
            "mask_rng": self.mask_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_checkpoint": self.best_checkpoint or "",
            "evals_without_gain": self.evals_without_gain,
        }
        extra = {}
        if self.heads is not None:  # the style embedding's heads
            from llmos.train.multitask import HEADS_FILE

            c = self.cfg
            config["heads"] = {**self.heads.describe(), "lambda_lm": c.lambda_lm, "lambda_cl": c.lambda_cl,
                               "lambda_task": c.lambda_task, "tau": c.tau}
            extra[HEADS_FILE] = heads_state
        return save_checkpoint(self.out, self.step, weights, config, self.data.path / "tokenizer.json", train_state,
                               self.cfg.keep_checkpoints, weights_file, protect=self.best_checkpoint, extra=extra)

    def _log(self, record: dict):
        if not self.d.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is None:
            try:  # TensorBoard logs too, when the tensorboard package is installed
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self.tensorboard = False
        if self.tensorboard and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def progress(self) -> float:
        """How far through the run, 0..1: by steps, or by wall time under a time limit."""
        p = self.step / self.cfg.max_steps
        if self.cfg.time_limit:
            p = max(p, (self.elapsed_before + time.perf_counter() - self.t0) / self.cfg.time_limit)
        return p

    def run(self, until_step: int | None = None) -> dict:
        """Train to max_steps (or the time limit); `until_step` pauses earlier with a checkpoint,
        as an interruption would, without changing the schedule."""
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.d.world * self.block
        last = {}
        self.saved_step = self.step if self.step else None  # a resumed run starts from a saved step
        self._ensure_reference()
        if self.step == 0:
            last = self._evaluate_and_save(first=True)
        window_t, window_tokens = time.perf_counter(), 0
        while self.step < min(cfg.max_steps, until_step or cfg.max_steps) and self.progress() < 1.0:
            self._ensure_reference()
            lr = learning_rate(cfg, self.progress(), self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total = torch.zeros((), device=self.d.device)
            self.term_sums = {}
            for micro in range(cfg.grad_accum):
                x, y, segments = self._batch("train", cfg.batch_size * self.d.world, self.data_gen, self._rows())
                sync = micro == cfg.grad_accum - 1 or not self.d.enabled
                if self.fsdp:  # reduce the gradients once, after the last micro-batch
                    self.net.set_requires_gradient_sync(sync)
                ctx = self.ddp.no_sync() if not sync and not self.fsdp else _null()
                with ctx:
                    loss = self._loss(x, y, segments) / cfg.grad_accum
                    loss.backward()
                total += loss.detach()
            if cfg.grad_clip > 0:
                trained = [p for p in self.net.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            else:
                grad_norm = float("nan")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._ensure_reference()  # DPO after supervised steps: before this step's evaluation
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            loss_value = float(all_reduce_mean(total, self.d))
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss became {loss_value} at step {self.step}: lower --lr, or raise --warmup-steps")
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                now = time.perf_counter()
                record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens": self.tokens_seen, "tokens_per_s": window_tokens / max(now - window_t, 1e-9),
                          "elapsed_s": self.elapsed_before + now - self.t0, **self.term_sums}
                window_t, window_tokens = now, 0
                self._log(record)
                self.on_log(record)
            if self.step % cfg.eval_interval == 0:
                last = self._evaluate_and_save()
                if cfg.early_stop and self.evals_without_gain >= cfg.early_stop:
                    last["early_stopped"] = True
                    self._log({"step": self.step, "early_stopped": True, "best_val_loss": self.best_val,
                               "best_checkpoint": self.best_checkpoint})
                    break
        if not last or last.get("step") != self.step or self.saved_step != self.step:
            # (a time limit spent before the first step still leaves a checkpoint to load and resume)
            last = self._evaluate_and_save()
        last["replicas_identical"] = self._replicas_identical()
        last["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.t0
        if self.d.main:
            self._log({"final": True, **last})
            plot_metrics(self.out)
        return last

    def _evaluate_and_save(self, first: bool = False) -> dict:
        metrics = {"step": self.step, **self.evaluate()}
        # the best of the checkpoints saved (the starting model's loss is reported, not a candidate)
        improved = not first and metrics["val_loss"] < self.best_val
        if not first:
            self.best_val = min(self.best_val, metrics["val_loss"])
        if not first:
            self.evals_without_gain = 0 if improved else self.evals_without_gain + 1
        if not first:
            if self.d.main:
                metrics["sample"] = self.sample()
            if improved and self.cfg.early_stop:
                self.best_checkpoint = checkpoint_name(self.out, self.step)  # the folder this save writes
            path = self.save()  # every process: under FSDP they gather the weights together
            if self.d.main:
                if improved and self.cfg.early_stop:
                    mark_best(self.out, path)
                metrics["checkpoint"] = str(path)
        self._log({k: v for k, v in metrics.items()})
        self.on_eval(metrics)
        return metrics

    def _replicas_identical(self) -> bool | None:
        """Distributed data-parallel runs: every rank's weights must be bit-identical after
        training (under FSDP each holds a different shard)."""
        if not self.d.enabled or self.fsdp:
            return None
        import hashlib

        import torch.distributed as dist

        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * self.d.world
        dist.all_gather_object(digests, h.hexdigest())
        return len(set(digests)) == 1

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.d.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def plot_metrics(run_dir: Path):
    """loss.png beside the checkpoints: training loss per logged step, validation per eval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps, losses, vsteps, vlosses = [], [], [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "final" not in r:
            steps.append(r["step"])
            losses.append(r["loss"])
        if "val_loss" in r and "final" not in r:
            vsteps.append(r["step"])
            vlosses.append(r["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, label="train (batch)", linewidth=0.8, alpha=0.7)
    ax.plot(vsteps, vlosses, "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(run_dir / "loss.png")
