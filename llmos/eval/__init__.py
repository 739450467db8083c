"""Evaluation of models as writers (`llmos eval`): perplexity and bits per byte on a held-out
text, diversity, repetition, slop, form and length over the writing tasks, copying and safety
flags, and a bias probe; one report per run, as JSON and as an HTML page (docs/eval.md).

metrics.py holds the measures (pure functions on texts and token ids), bias.py the probe,
report.py the runs per model and the rendering.
"""

from llmos.eval.report import EvalError, EvalSettings, build_report, evaluate_model, load_checks, write_report

__all__ = ["EvalError", "EvalSettings", "build_report", "evaluate_model", "load_checks", "write_report"]
