"""`llmos prepare | ngram | train | export | embed`: thin commands over llmos.data, llmos.train.ngram,
llmos.train and llmos.weights.export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import PullProgress, err, fail, load_llm, out


def prepare(
    inputs: Annotated[list[str], typer.Argument(help="Files, folders and globs of .txt, .md and .jsonl (a 'text' field).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Dataset folder to write.")],
    tokenizer: Annotated[str, typer.Option(help="'char', 'bpe', or a model whose tokenizer to reuse (for fine-tuning).")] = "char",
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size for --tokenizer bpe.")] = 8192,
    val_fraction: Annotated[float, typer.Option(help="Share of the text held out for validation.")] = 0.1,
    separator: Annotated[Optional[str], typer.Option(help="A line equal to this splits text files into records (e.g. '%').")] = None,
    no_dedup: Annotated[bool, typer.Option("--no-dedup", help="Keep exact and near-duplicate documents.")] = False,
    near_dup_threshold: Annotated[float, typer.Option(help="Estimated Jaccard similarity above which a document is a near duplicate.")] = 0.8,
    lowercase: Annotated[bool, typer.Option(help="Lowercase everything (off: it costs a generative model its capitals).")] = False,
    remove_stopwords: Annotated[bool, typer.Option(help="Drop English stopwords (off: the model would learn to write without them).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split (and of --augment).")] = 1337,
    group_by: GroupByOpt = "document",
    label_field: LabelFieldOpt = "label",
    augment: AugmentOpt = [],
    augment_copies: AugmentCopiesOpt = 1,
    augment_model: AugmentModelOpt = None,
    no_copy_index: Annotated[bool, typer.Option("--no-copy-index", help="Skip the training split's index for `llmos check` (about 13 bytes per character).")] = False,
):
    """Clean, deduplicate, split and tokenize a corpus into memory-mapped token shards, and index
    the training split for the copying check (`llmos check`).

    Examples:

      llmos prepare benchmarks/data/tinyshakespeare.txt -o data/shake --tokenizer char

      llmos prepare my_poems/ notes.jsonl -o data/mine --tokenizer bpe --vocab-size 4096

      llmos prepare letters/ -o data/ft --tokenizer smollm2-135m-instruct

      llmos prepare stories.jsonl -o data/mt --tokenizer smollm2-135m-instruct --group-by author --augment crop,shuffle
    """
    from llmos.data.prepare import PrepareConfig, PrepareError, prepare as run

    cfg = PrepareConfig([str(i) for i in inputs], str(output), tokenizer, vocab_size, val_fraction, seed, separator,
                        not no_dedup, near_dup_threshold, lowercase, remove_stopwords, group_by=group_by,
                        label_field=label_field, augment=list(augment), augment_copies=augment_copies,
                        augment_model=augment_model, copy_index=not no_copy_index)
    progress = PullProgress()
    try:
        report = run(cfg, progress, _translator(augment_model))
    except (PrepareError, ValueError) as e:
        progress.close()
        fail(str(e))
    progress.close()
    from rich.table import Table

    table = Table("", "", title=f"prepared {output}", show_header=False)
    for key in ("files", "documents_read", "exact_duplicates_removed", "near_duplicates_removed", "documents_kept",
                "train_documents", "val_documents", "train_tokens", "val_tokens", "vocab_size"):
        table.add_row(key.replace("_", " "), f"{report[key]:,}")
    out.print(table)
    _report_extras(report)


def _translator(model: str | None):
    """The paraphraser --augment backtranslate uses, when --augment-model names a model."""
    if not model:
        return None
    from llmos.writing.paraphrase import BackTranslator

    return BackTranslator(model)


def _report_extras(report: dict):
    for s in report["skipped"]:
        err.print(f"[yellow]skipped[/] {s['file']}: {s['reason']}", highlight=False)
    aug = report.get("augmentation")
    if aug:
        err.print(f"augmented: {aug['views_added']:,} new views ({'+'.join(aug['transforms'])}, {aug['copies']} per "
                  f"document, seed {aug['seed']}), {aug['chars_before']:,} -> {aug['chars_after']:,} characters, "
                  f"{100 * aug['mean_changed']:.0f}% of lines changed on average; {aug['views_unchanged']} unchanged "
                  f"views dropped (each view in report.json)", highlight=False)


def ngram(
    data: Annotated[Path, typer.Argument(help="A folder written by `llmos prepare`.")],
    order: Annotated[int, typer.Option(help="n of the n-gram model.")] = 5,
):
    """The classical baseline: an interpolated Kneser-Ney n-gram model's validation perplexity."""
    from llmos.train.ngram import evaluate_dataset
    from llmos.train.data import DataError

    try:
        r = evaluate_dataset(data, order)
    except (DataError, ValueError) as e:
        fail(str(e))
    out.print(f"{order}-gram Kneser-Ney: validation loss {r['val_loss']:.4f} nats/token, "
              f"perplexity {r['val_perplexity']:.2f} ({r['train_tokens']:,} train / {r['val_tokens']:,} val tokens)",
              highlight=False)


# Options shared by `train` and `finetune` (None: not given, the defaults or the YAML decide).
ConfigOpt = Annotated[Optional[Path], typer.Option(help="A YAML file of training options (a 'model:' mapping overrides model fields).")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a model field, e.g. --set n_layer=6 --set dropout=0.1.")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Sequences per step and process.")]
BlockOpt = Annotated[Optional[int], typer.Option(help="Context length in training (default: the model's).")]
AccumOpt = Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Optimizer steps.")]
TimeOpt = Annotated[Optional[str], typer.Option(help="Stop after this long, e.g. 90s, 5m, 1h (the schedule follows the clock).")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate.")]
MinLrOpt = Annotated[Optional[float], typer.Option(help="Final learning rate (default lr/10).")]
WarmupOpt = Annotated[Optional[int], typer.Option()]
DecayOpt = Annotated[Optional[float], typer.Option()]
OptimizerOpt = Annotated[Optional[str], typer.Option(help="adamw, or muon (orthogonalized updates for hidden matrices; more per step for small models).")]
ClipOpt = Annotated[Optional[float], typer.Option(help="Clip the gradient norm (0 = off).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="auto, fp32 or bf16 (autocast).")]
EvalIntervalOpt = Annotated[Optional[int], typer.Option(help="Steps between validation, samples and checkpoints.")]
EvalItersOpt = Annotated[Optional[int], typer.Option(help="Batches per validation estimate.")]
LogIntervalOpt = Annotated[Optional[int], typer.Option(help="Steps between lines in metrics.jsonl.")]
SeedOpt = Annotated[Optional[int], typer.Option()]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --output where it stopped.")]
LoraOpt = Annotated[Optional[int], typer.Option(help="Train a LoRA adapter of this rank (8 is typical) instead of every weight.")]
LoraAlphaOpt = Annotated[Optional[float], typer.Option(help="LoRA scale numerator (default: 2 x rank).")]
LoraDropoutOpt = Annotated[Optional[float], typer.Option(help="Dropout on the adapter's input (default 0: a mask per linear costs ~10% of a CPU step).")]
LoraTargetsOpt = Annotated[Optional[str], typer.Option(help="Linears to adapt, comma-separated: wqkv, wo (attention), w13, w2 (MLP); default all four.")]
EarlyStopOpt = Annotated[Optional[int], typer.Option(help="Stop after this many evaluations without a better validation loss; the run folder then loads its best checkpoint.")]
ShardingOpt = Annotated[Optional[str], typer.Option(help="Under torchrun: ddp (each process holds the whole model) or fsdp (weights, gradients and optimizer state sharded across the processes, for models that do not fit one device).")]
LambdaLmOpt = Annotated[Optional[float], typer.Option(help="multitask: weight of the next-token loss.")]
LambdaClOpt = Annotated[Optional[float], typer.Option(help="multitask: weight of the contrastive loss (InfoNCE between two passages of one source).")]
LambdaTaskOpt = Annotated[Optional[float], typer.Option(help="multitask: weight of the label classification loss (JSONL 'label').")]
TauOpt = Annotated[Optional[float], typer.Option(help="multitask: InfoNCE temperature.")]
ProjectionOpt = Annotated[Optional[int], typer.Option(help="multitask: size of the style embedding.")]
GroupByOpt = Annotated[str, typer.Option(help="Contrastive positives: passages of one 'document', or of one value of this JSONL field (e.g. author).")]
LabelFieldOpt = Annotated[str, typer.Option(help="The JSONL field holding each document's class, for the multitask label head.")]
AugmentOpt = Annotated[list[str], typer.Option("--augment", help="New views of each training document: crop, shuffle (sentences within a paragraph), backtranslate (repeatable or comma-separated; applied in order).")]
AugmentCopiesOpt = Annotated[int, typer.Option(help="Views made of each training document with --augment.")]
AugmentModelOpt = Annotated[Optional[str], typer.Option(help="The model that translates for --augment backtranslate.")]


def _multitask_flags(lambda_lm, lambda_cl, lambda_task, tau, projection_dim) -> dict:
    return dict(lambda_lm=lambda_lm, lambda_cl=lambda_cl, lambda_task=lambda_task, tau=tau, projection_dim=projection_dim)


def train(
    data: Annotated[Path, typer.Argument(help="A folder written by `llmos prepare`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder: checkpoints, metrics.jsonl, loss.png.")],
    preset: Annotated[Optional[str], typer.Option(help="Model size: baby-gpt, tiny, small, base.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],
    init_from: Annotated[Optional[str], typer.Option(help="Start from this model's weights (fine-tuning).")] = None,
    objective: Annotated[Optional[str], typer.Option(help="clm (next token), mlm (masked tokens, an encoder) or multitask (next token + contrastive style embedding + labels).")] = None,
    batch_size: BatchOpt = None,
    block_size: BlockOpt = None,
    grad_accum: AccumOpt = None,
    max_steps: StepsOpt = None,
    time_limit: TimeOpt = None,
    lr: LrOpt = None,
    min_lr: MinLrOpt = None,
    warmup_steps: WarmupOpt = None,
    weight_decay: DecayOpt = None,
    optimizer: OptimizerOpt = None,
    grad_clip: ClipOpt = None,
    dtype: DtypeOpt = None,
    eval_interval: EvalIntervalOpt = None,
    eval_iters: EvalItersOpt = None,
    log_interval: LogIntervalOpt = None,
    seed: SeedOpt = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None,
    early_stop: EarlyStopOpt = None,
    lambda_lm: LambdaLmOpt = None,
    lambda_cl: LambdaClOpt = None,
    lambda_task: LambdaTaskOpt = None,
    tau: TauOpt = None,
    projection_dim: ProjectionOpt = None,
    sharding: ShardingOpt = None,
    resume: ResumeOpt = False,
):
    """Train a Transformer on a prepared dataset, from scratch or from a pretrained model.

    Runs unchanged under torchrun for several processes or machines. Examples:

      llmos train data/shake -o runs/shake --preset tiny --time-limit 5m

      llmos train data/shake -o runs/shake --resume

      torchrun --nproc_per_node=2 -m llmos train data/shake -o runs/ddp --preset tiny

      torchrun --nproc_per_node=2 -m llmos train data/ft -o runs/big --init-from gemma3-270m --sharding fsdp
    """
    from llmos.train.config import build_train_config
    from llmos.train.trainer import TrainError, Trainer

    flags = dict(preset=preset, init_from=init_from, objective=objective, batch_size=batch_size,
                 block_size=block_size, grad_accum=grad_accum, max_steps=max_steps, time_limit=time_limit, lr=lr,
                 min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay, optimizer=optimizer,
                 grad_clip=grad_clip, dtype=dtype, eval_interval=eval_interval, eval_iters=eval_iters,
                 log_interval=log_interval, seed=seed, **_lora_flags(lora, lora_alpha, lora_dropout, lora_targets),
                 early_stop=early_stop, sharding=sharding,
                 **_multitask_flags(lambda_lm, lambda_cl, lambda_task, tau, projection_dim))
    try:
        cfg = build_train_config(output, config_file=config, flags=flags, set_pairs=set_, resume=resume)
        trainer = Trainer(data, output, cfg, resume=resume)
    except (TrainError, ValueError, TypeError) as e:
        fail(str(e))
    _run_with_progress(trainer)


def _lora_flags(rank, alpha, dropout, targets) -> dict:
    return dict(lora=rank, lora_alpha=alpha, lora_dropout=dropout,
                lora_targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None)


def finetune(
    model: Annotated[str, typer.Option("--model", "-m", help="The model to adapt: a bundled name, a checkpoint or a run.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder; use it as a model name afterwards (-m RUN).")],
    data: Annotated[Optional[list[str]], typer.Argument(
        help="Your text (files, folders, .txt/.md), JSONL of chats ('messages') or prompt/completion pairs, or a "
             "folder from `llmos prepare`. With --dpo: JSONL files of preference pairs, or nothing for the pairs "
             "collected in the store (`llmos prefs`).", show_default=False)] = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None,
    early_stop: EarlyStopOpt = None,
    objective: Annotated[Optional[str], typer.Option(help="clm (next token), or multitask: next token + a contrastive style embedding + labels (--lambda-*, --tau).")] = None,
    dpo: Annotated[bool, typer.Option("--dpo", help="Learn from preference pairs (chosen over rejected answers) by direct preference optimization; the reference is the starting model.")] = False,
    beta: Annotated[Optional[float], typer.Option(help="--dpo: how far the model may move from its reference (default 0.1; higher keeps it closer).")] = None,
    sft_steps: Annotated[Optional[int], typer.Option(help="--dpo: first train this many steps on the chosen answers alone (supervised); the reference is the model after them.")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="--dpo from the store: only pairs of this source (see `llmos prefs stats`).")] = None,
    lambda_lm: LambdaLmOpt = None,
    lambda_cl: LambdaClOpt = None,
    lambda_task: LambdaTaskOpt = None,
    tau: TauOpt = None,
    projection_dim: ProjectionOpt = None,
    group_by: GroupByOpt = "document",
    label_field: LabelFieldOpt = "label",
    augment: AugmentOpt = [],
    augment_copies: AugmentCopiesOpt = 1,
    augment_model: AugmentModelOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the data held out for validation.")] = 0.1,
    config: ConfigOpt = None,
    set_: SetOpt = [],
    batch_size: BatchOpt = None,
    block_size: BlockOpt = None,
    grad_accum: AccumOpt = None,
    max_steps: StepsOpt = None,
    time_limit: TimeOpt = None,
    lr: LrOpt = None,
    min_lr: MinLrOpt = None,
    warmup_steps: WarmupOpt = None,
    weight_decay: DecayOpt = None,
    grad_clip: ClipOpt = None,
    dtype: DtypeOpt = None,
    eval_interval: EvalIntervalOpt = None,
    eval_iters: EvalItersOpt = None,
    log_interval: LogIntervalOpt = None,
    seed: SeedOpt = None,
    sharding: ShardingOpt = None,
    resume: ResumeOpt = False,
):
    """Adapt a model to your writing (plain text) or teach it an instruction format (chats,
    prompt/completion pairs: the loss is on the assistant's words only), with a LoRA adapter
    (--lora R, stored small) or every weight. The same training loop and options as `llmos
    train --init-from MODEL`, with defaults for fine-tuning; the data is prepared with the
    model's own tokenizer and chat template into RUN/data.

    Examples:

      llmos finetune my_stories/ -m smollm2-135m-instruct -o runs/style --lora 8 --time-limit 10m

      llmos finetune chats.jsonl -m smollm2-135m-instruct -o runs/sft --lora 16 --early-stop 3

      llmos write story "a storm at sea" -m runs/style

      llmos finetune authors.jsonl -m smollm2-135m-instruct -o runs/mt --lora 8 --objective multitask --group-by author

      llmos write story "a storm at sea" -n 4 --rank style:runs/mt

      llmos merge runs/style -o models/style      # a standalone checkpoint

      llmos finetune --dpo -m smollm2-135m-instruct -o runs/prefs --lora 8      # the pairs in `llmos prefs`

      llmos finetune pairs.jsonl --dpo -m smollm2-135m-instruct -o runs/prefs --lora 8 --beta 0.2 --sft-steps 20
    """
    from llmos.train.config import FINETUNE_DEFAULTS, build_train_config
    from llmos.train.trainer import TrainError, Trainer

    from llmos.train.checkpoint import CheckpointError, latest_checkpoint
    from llmos.train.config import saved_train_config

    try:
        existing = latest_checkpoint(output)
    except CheckpointError as e:
        fail(str(e))
    if existing is not None and not resume:  # before anything is prepared into the run folder
        fail(f"{output} already holds a training run ({existing.name}); pass --resume to continue it, "
             f"or choose another -o folder")
    saved = saved_train_config(output) if resume and existing is not None else {}
    if saved and saved.get("init_from") == model and objective in (None, saved.get("objective")):
        model_flag, objective = None, None  # resuming: the run's saved options, as `llmos train --resume`
    else:
        model_flag = model
    data = list(data or [])
    dpo = dpo or objective == "dpo"
    if dpo:
        objective = None if model_flag is None else "dpo"
        dataset = _preference_data(data, model, output, val_fraction, seed, resume, source)
    elif not data:
        fail("give the text to learn from (files, folders, JSONL), or --dpo to learn from preference pairs")
    else:
        extra = dict(group_by=group_by, label_field=label_field, augment=list(augment), augment_copies=augment_copies,
                     augment_model=augment_model)
        dataset = _finetune_data(data, model, output, val_fraction, seed, resume, extra)
    flags = dict(init_from=model_flag, objective=objective, batch_size=batch_size, block_size=block_size, grad_accum=grad_accum,
                 max_steps=max_steps, time_limit=time_limit, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                 weight_decay=weight_decay, grad_clip=grad_clip, dtype=dtype, eval_interval=eval_interval,
                 eval_iters=eval_iters, log_interval=log_interval, seed=seed,
                 **_lora_flags(lora, lora_alpha, lora_dropout, lora_targets), early_stop=early_stop, sharding=sharding,
                 **_multitask_flags(lambda_lm, lambda_cl, lambda_task, tau, projection_dim), beta=beta, sft_steps=sft_steps)
    try:
        kind = ("dpo-" if dpo else "") + ("lora" if lora or saved.get("lora") else "full")
        cfg = build_train_config(output, config_file=config, flags=flags, set_pairs=set_, resume=resume,
                                 defaults=FINETUNE_DEFAULTS[kind])
        trainer = Trainer(dataset, output, cfg, resume=resume)
    except (TrainError, ValueError, TypeError) as e:
        fail(str(e))
    _run_with_progress(trainer)


def _finetune_data(data: list[str], model: str, output: Path, val_fraction: float, seed: int | None,
                   resume: bool, extra: dict | None = None) -> Path:
    """A prepared dataset folder as given, or the data prepared with the model's tokenizer in RUN/data."""
    if len(data) == 1 and (Path(data[0]) / "meta.json").is_file():
        return Path(data[0])
    folder = output / "data"
    if resume and (folder / "meta.json").is_file():
        return folder
    import os

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun the first process prepares, the others wait
        import time

        deadline = time.time() + 3600
        while not (folder / "meta.json").is_file():
            if time.time() > deadline:
                fail(f"waited an hour for the first process to prepare {folder}")
            time.sleep(0.5)
        return folder
    from llmos.data.prepare import PrepareConfig, PrepareError, prepare as run

    progress = PullProgress()
    try:
        report = run(PrepareConfig(list(data), str(folder), model, val_fraction=val_fraction,
                                   seed=1337 if seed is None else seed,
                                   **(extra or {})), progress, _translator((extra or {}).get("augment_model")))
    except (PrepareError, ValueError) as e:
        progress.close()
        fail(str(e))
    progress.close()
    _report_extras(report)
    loss = report.get("loss_tokens")
    err.print(f"data: {report['train_documents']:,} training and {report['val_documents']:,} held-out "
              f"{'examples' if loss else 'documents'}, {report['train_tokens']:,} + {report['val_tokens']:,} tokens"
              + (f" ({loss['train']:,} of them the assistant's, which carry the loss)" if loss else ""), highlight=False)
    return folder


def _preference_data(data: list[str], model: str, output: Path, val_fraction: float, seed: int | None,
                     resume: bool, source: str | None) -> Path:
    """--dpo's dataset: a prepared preference folder as given, or the pairs of JSONL files (or of
    the store) tokenized with the model's tokenizer into RUN/data."""
    from llmos.data.prefs import SOURCES, Preferences, PrefsError, prepare_preferences, read_jsonl
    from llmos.db import Store, StoreError

    if len(data) == 1 and (Path(data[0]) / "meta.json").is_file():
        if not json.loads((Path(data[0]) / "meta.json").read_text()).get("preference"):
            fail(f"{data[0]} holds text, not preference pairs: give JSONL files of pairs, or nothing for the store's")
        return Path(data[0])
    folder = output / "data"
    if resume and (folder / "meta.json").is_file():
        return folder
    if source is not None and source not in SOURCES:
        fail(f"unknown source {source!r}; sources: {', '.join(SOURCES)}")
    try:
        if data:
            if source is not None:
                fail("--source picks pairs from the store; with JSONL files, give only the files")
            pairs = [p for f in data for p in read_jsonl(f)]
        else:
            pairs = Preferences(Store()).list(source)
            if not pairs:
                fail("the store holds no preference pairs" + (f" from {source}" if source else "") + ": rate chat "
                     "replies (/rate), /retry and go on, keep a candidate (`llmos write -n 4 --pick ask`), or give "
                     "a JSONL file of pairs (`llmos prefs import`)")
        report = prepare_preferences(pairs, model, folder, val_fraction, 1337 if seed is None else seed)
    except (PrefsError, StoreError) as e:
        fail(str(e))
    sources = ", ".join(f"{n} {s}" for s, n in report["sources"].items())
    err.print(f"pairs: {report['train_pairs']:,} training and {report['val_pairs']:,} held out (other prompts), "
              f"from {sources}", highlight=False)
    return folder


def merge(
    run: Annotated[str, typer.Argument(help="A LoRA run folder or adapter checkpoint.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder of the standalone checkpoint to write.")],
):
    """Merge a LoRA adapter into its base model's weights and write a standalone checkpoint
    (no adapter, no reference to the base: it loads and exports like any model)."""
    from llmos.weights import store

    try:
        path = store.merge_adapter(store.resolve(run), output)
    except store.ModelError as e:
        fail(str(e))
    err.print(f"[green]merged[/] into {path}", highlight=False)


def _run_with_progress(trainer):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from llmos.train.trainer import TrainError

    main = trainer.d.main
    mc = trainer.model_config
    if main:
        err.print(f"model: {mc.n_layer} layers, {mc.n_head} heads, width {mc.d_model}, context {trainer.block}, "
                  f"{trainer.model.num_params() / 1e6:.2f}M parameters; {trainer.d.world} process(es) on {trainer.d.device}",
                  highlight=False)
    progress = Progress(TextColumn("step {task.fields[step]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, disable=not main)
    task = progress.add_task("train", total=1000, step=trainer.step, loss="-", tps="-")

    def on_log(r):
        progress.update(task, completed=int(1000 * trainer.progress()), step=r["step"], loss=f"{r['loss']:.4f}",
                        tps=f"{r['tokens_per_s']:,.0f}")

    def on_eval(m):
        if main:
            terms = "".join(f", {k[4:].replace('_', ' ')} {m[k]:.3f}" for k in
                            ("val_cl_loss", "val_cl_acc", "val_task_loss", "val_task_acc", "val_pref_acc",
                             "val_margin", "val_logp_acc", "val_chosen_nll", "val_logratio") if k in m)
            progress.console.print(f"step {m['step']}: val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f}), "
                                   f"train loss {m['train_loss']:.4f}{terms}", highlight=False)
            if m.get("sample"):
                progress.console.print(f"[dim]{m['sample'][:400]}[/]", highlight=False, markup=True)

    trainer.on_log, trainer.on_eval = on_log, on_eval
    trainer.on_status = lambda message: err.print(message, highlight=False) if main else None
    try:
        with progress:
            final = trainer.run()
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/] (Ctrl-C); the last checkpoint is intact: continue with --resume")
        raise typer.Exit(130)
    except TrainError as e:
        fail(str(e))
    finally:
        trainer.close()
    if main:
        err.print(f"[green]done:[/] step {final['step']}, val loss {final['val_loss']:.4f} "
                  f"(ppl {final['val_ppl']:.2f}); checkpoint in {trainer.out}", highlight=False)
    if trainer.d.enabled:
        # A process of a distributed run leaves without the interpreter's teardown: there, the
        # process group's worker threads (still referenced by the sharded model) are destroyed
        # late and can abort the process after a run that succeeded (seen about once in 24
        # two-process runs on a loaded machine). Everything is written and closed by now.
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def export(
    run: Annotated[str, typer.Argument(help="A run folder, checkpoint folder or model name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="hf: a Hugging Face Llama folder.")] = "hf",
):
    """Export a model so other engines (transformers, vLLM, TGI, llama.cpp's converter) can serve it."""
    from llmos.weights import store as models
    from llmos.weights.export import ExportError, export as run_export

    try:
        path = run_export(models.resolve(run), output, fmt)
    except (ExportError, models.ModelError) as e:
        fail(str(e))
    err.print(f"[green]exported[/] to {path}", highlight=False)


def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model (an --objective mlm run embeds best).")] = None,
):
    """Print one L2-normalised vector per text, as JSON: the mean of the final hidden states, or,
    for a model trained with --objective multitask, its style embedding (that mean through its
    projection head)."""
    llm = load_llm(model, "fp32")
    vectors = llm.embed(texts)
    print(json.dumps({"model": llm.name, "dim": vectors.shape[1], "embeddings": [[round(x, 6) for x in v.tolist()] for v in vectors]}))
