"""Corpus preparation, training, the n-gram baseline and export over HTTP, as jobs: each runs
the `llmos` command in a child process (server/jobs.py). Options are checked before a job
starts, training options by the same builder as `llmos train`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Request as HTTPRequest

from llmos.server import protocol as P
from llmos.server.errors import APIError, not_found
from llmos.server.state import state

router = APIRouter(tags=["Training jobs"])


def _start(http: HTTPRequest, kind: str, args: list[str], folder: str | None = None) -> dict:
    return state(http).jobs.start(kind, args, folder).to_dict()


@router.post("/api/prepare", response_model=P.JobInfo, status_code=202)
def prepare(body: P.PrepareBody, http: HTTPRequest):
    """Clean, deduplicate, split and tokenize a corpus (`llmos prepare`)."""
    args = ["prepare", *body.inputs, "-o", body.output, "--tokenizer", body.tokenizer, "--vocab-size", str(body.vocab_size),
            "--val-fraction", str(body.val_fraction), "--near-dup-threshold", str(body.near_dup_threshold),
            "--seed", str(body.seed)]
    if body.separator is not None:
        args += ["--separator", body.separator]
    args += [flag for on, flag in ((not body.dedup, "--no-dedup"), (body.lowercase, "--lowercase"),
                                   (body.remove_stopwords, "--remove-stopwords")) if on]
    return _start(http, "prepare", args, body.output)


@router.post("/api/train", response_model=P.JobInfo, status_code=202)
def train(body: P.TrainBody, http: HTTPRequest):
    """Train from scratch or from a model's weights (`llmos train`); resumable; progress in the
    job's `progress` (its metrics.jsonl)."""
    import yaml

    from llmos.train.config import TrainError, build_train_config

    if not Path(body.data).is_dir():
        raise APIError(400, f"{body.data} is not a dataset folder: write one with POST /api/prepare", "data")
    options = dict(body.options)
    model = options.pop("model", None)
    try:
        cfg = build_train_config(Path(body.output), flags=options, set_pairs=body.set, resume=body.resume,
                                 options={"model": model} if model is not None else None)
    except (TrainError, ValueError, TypeError) as e:
        raise APIError(400, str(e), "options") from None
    config = state(http).jobs.folder() / f"train-{time.time_ns()}.yaml"  # the merged options, exactly
    config.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), encoding="utf-8")
    args = ["train", body.data, "-o", body.output, "--config", str(config)] + (["--resume"] if body.resume else [])
    return _start(http, "train", args, body.output)


@router.post("/api/ngram", response_model=P.JobInfo, status_code=202)
def ngram(body: P.NgramBody, http: HTTPRequest):
    """The Kneser-Ney n-gram baseline's validation perplexity (`llmos ngram`), in the job's log."""
    return _start(http, "ngram", ["ngram", body.data, "--order", str(body.order)])


@router.post("/api/export", response_model=P.JobInfo, status_code=202)
def export(body: P.ExportBody, http: HTTPRequest):
    """Export a model for other engines (`llmos export`)."""
    return _start(http, "export", ["export", body.model, "-o", body.output, "--format", body.format], body.output)


@router.get("/api/jobs", response_model=P.JobList)
def list_jobs(http: HTTPRequest):
    return {"jobs": [j.to_dict(tail=False) for j in state(http).jobs.list()]}


def _job(http: HTTPRequest, job_id: int):
    job = state(http).jobs.get(job_id)
    if job is None:
        raise not_found(f"no job {job_id}; GET /api/jobs lists them", "job_id")
    return job


@router.get("/api/jobs/{job_id}", response_model=P.JobInfo)
def show_job(job_id: P.RowId, http: HTTPRequest):
    """A job's status, the end of its output and (training) its latest metrics."""
    return _job(http, job_id).to_dict()


@router.post("/api/jobs/{job_id}/stop", response_model=P.JobInfo)
def stop_job(job_id: P.RowId, http: HTTPRequest):
    """Stop a job as Ctrl-C would: a training run keeps its last checkpoint (resume it later)."""
    job = _job(http, job_id)
    state(http).jobs.stop(job)
    try:
        job.process.wait(timeout=30)
    except Exception:  # still shutting down: its status says so
        pass
    return job.to_dict()
