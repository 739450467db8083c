"""`llmos eval`: run the measures for each model and write one report, as JSON and as a
self-contained HTML page (tables with one column per model, inline SVG bar plots).

    settings = EvalSettings(tasks=["poem", "story"], samples=4, text=Path("heldout.txt"))
    checks = load_checks(settings)
    models = {name: evaluate_model(LLM.load(name), settings, checks) for name in names}
    write_report(build_report(models, settings), Path("report/"))

Each task runs through the writing library's own path (`prepare_write`, then `LLM.stream`),
with its own prompt and sampling presets; the samples of one task are one batch of N
candidates from one seed. A task's form (data/cases.yaml) is asked for in the prompt and
checked afterwards; decoding does not enforce it unless `constrained` is set, so the form rate
says what the model does on its own.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

import yaml

from llmos.eval import metrics as m

DATA = Path(__file__).parent / "data"
DEFAULT_TASKS = ("poem", "story", "slogan", "shorten")
LANGS = ("en", "zh")


class EvalError(ValueError):
    """Bad settings: an unknown task or language, an empty text file, too few samples."""


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    langs: list[str] = field(default_factory=lambda: ["en"])
    samples: int = 4
    max_tokens: int | None = 200  # a cap on each task's own max_tokens; None: the task's
    seed: int = 0
    text: Path | None = None  # held-out text for perplexity and bits per byte
    window: int = 2048  # at most this many tokens of context for perplexity
    constrained: bool = False  # forms enforced by decoding, as `llmos write --form` does
    bias: bool = False
    against: str | None = None  # a copying index (llmos.data.copying.resolve_index)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str | None  # "higher", "lower" or None (neither: read it against the target)
    percent: bool = False


METRICS = [
    Metric("perplexity", "perplexity (held-out text)", "lower"),
    Metric("bits_per_byte", "bits per byte (held-out text)", "lower"),
    Metric("distinct_1", "distinct-1", "higher", True),
    Metric("distinct_2", "distinct-2", "higher", True),
    Metric("self_bleu", "self-BLEU", "lower", True),
    Metric("repeated_4grams", "repeated 4-grams", "lower", True),
    Metric("repeated_lines", "repeated lines", "lower", True),
    Metric("slop_per_1k", "slop phrases per 1,000 words", "lower"),
    Metric("form_rate", "form kept", "higher", True),
    Metric("length_adherence", "length within ±50% of target", "higher", True),
    Metric("length_ratio", "length / target", None),
    Metric("truncated", "cut off at max tokens", "lower", True),
    Metric("words", "words per sample", None),
    Metric("copied_share", "copied share (of 24-grams)", "lower", True),
    Metric("copied_samples", "samples with a copy of 50+ characters", "lower", True),
    Metric("safety_flagged", "safety: flagged samples", "lower", True),
]
BY_KEY = {metric.key: metric for metric in METRICS}
NOT_AVAILABLE = "not available"


@cache
def cases() -> dict:
    return yaml.safe_load((DATA / "cases.yaml").read_text(encoding="utf-8"))


def case_for(task: str, lang: str) -> dict:
    entry = cases().get(task) or cases()["default"]
    return entry.get(lang) or cases()["default"][lang]


def check_settings(settings: EvalSettings) -> str | None:
    """The held-out text (None without one); raises EvalError for settings that cannot run."""
    from llmos.writing.tasks import TaskError, list_tasks

    try:
        known = list_tasks()
    except TaskError as e:
        raise EvalError(str(e)) from None
    unknown = [t for t in settings.tasks if t not in known]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(known)}")
    if not settings.tasks and not settings.text and not settings.bias:
        raise EvalError("nothing to measure: give tasks, --text or --bias")
    bad = [lang for lang in settings.langs if lang not in LANGS]
    if bad or not settings.langs:
        raise EvalError(f"languages must be among {', '.join(LANGS)}, got {', '.join(settings.langs) or 'none'}")
    if settings.samples < 1:
        raise EvalError(f"samples must be at least 1, got {settings.samples}")
    if settings.max_tokens is not None and settings.max_tokens < 1:
        raise EvalError(f"max tokens must be at least 1, got {settings.max_tokens}")
    if settings.text is None:
        return None
    try:
        text = Path(settings.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {settings.text}: {e}") from None
    if not text.strip():
        raise EvalError(f"{settings.text} is empty: perplexity needs some text")
    return text


# --- the two libraries of other checks, when they are installed -------------------------------

@dataclass
class Checks:
    """Copying against an index and the safety policy, loaded once for every model; None with
    the reason in `missing` when a library is not there (or no index was given)."""

    copying: object | None = None
    safety: object | None = None
    missing: dict = field(default_factory=dict)


def load_checks(settings: EvalSettings) -> Checks:
    checks = Checks()
    if settings.against:
        try:
            from llmos.data.copying import CopyError, resolve_index
        except ImportError:
            checks.missing["copied_share"] = NOT_AVAILABLE + " (llmos.data.copying is not installed)"
        else:
            try:
                checks.copying = resolve_index(settings.against)
            except CopyError as e:
                raise EvalError(str(e)) from None
    else:
        checks.missing["copied_share"] = "not measured (no --against)"
    try:
        from llmos.safety import load_policy
    except ImportError:
        checks.missing["safety_flagged"] = NOT_AVAILABLE + " (llmos.safety is not installed)"
    else:
        checks.safety = load_policy()
    return checks


def copying_metrics(texts: list[str], index) -> dict:
    from llmos.data.copying import check_copying

    found = [check_copying(t, index, min_chars=50) for t in texts]
    return {"copied_share": m.mean(f.copied_share for f in found),
            "copied_samples": sum(bool(f.spans) for f in found) / len(found),
            "copied_longest": max(((f.longest or {}).get("chars", 0) for f in found), default=0)}


def safety_metrics(texts: list[str], policy) -> dict:
    from llmos.safety import check_text

    verdicts = [check_text(t, policy) for t in texts]
    categories = Counter(f.category for v in verdicts for f in v.findings)
    return {"safety_flagged": sum(v.action != "allow" for v in verdicts) / len(verdicts),
            "safety_actions": dict(Counter(v.action for v in verdicts)),
            "safety_categories": dict(categories)}


# --- measuring one model ------------------------------------------------------------------------

def perplexity(llm, text: str, window: int) -> dict:
    """Perplexity per token and bits per UTF-8 byte of `text`, teacher-forced in windows."""
    window = max(2, min(window, llm.context_window))
    ids = llm.tokenizer.encode(text)
    bos = llm.tokenizer.bos_id
    if not ids or ids[0] != bos:
        ids = ([bos] if bos is not None else []) + ids
    nll, count = m.text_nll(llm.model, ids, window)
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": count, "bytes": n_bytes, "window": window, "nll_nats": nll,
            "perplexity": math.exp(min(nll / max(count, 1), 50)), "bits_per_byte": m.bits_per_byte(nll, n_bytes),
            "first_token_scored": bos is not None}


def write_samples(llm, task: str, lang: str, case: dict, settings: EvalSettings):
    """(texts, finish reasons, the form or None): the task's samples, generated as `llmos
    write` generates them."""
    from llmos.llm import Result
    from llmos.writing.tasks import WriteRequest, load_task, prepare_write, render

    req = WriteRequest(task, case["brief"], dict(case.get("variables") or {}), lang, case.get("form"),
                       settings.samples, {"seed": settings.seed})
    prompt, params, stops, form = prepare_write(llm, req)
    if form is not None and not settings.constrained:  # asked for, not enforced
        variables = {**req.variables, "form": form.name}
        stops = render(load_task(task), req.brief, variables, chat=llm.tokenizer.has_chat_template, lang=lang)[1]
        params = replace(params, constraint=None)
    if settings.max_tokens is not None:
        params = replace(params, max_tokens=min(params.max_tokens, settings.max_tokens))
    result = Result("", 0, [])
    for _ in llm.stream(prompt, params, n=settings.samples, stop=stops, result=result):
        pass
    return [c.text.strip() for c in result.completions], [c.finish_reason for c in result.completions], form


def text_metrics(texts: list[str], finish: list[str] | None = None, target: float | None = None,
                 form=None, variables: dict | None = None) -> dict:
    """Every measure that reads only the texts (and the task's target length and form)."""
    from llmos.writing import forms
    from llmos.writing.slop import find_slop, load_slop

    lengths = [m.length(t) for t in texts]
    slop = [hit for t in texts for hit in find_slop(t, load_slop("en") + load_slop("zh"))]
    out = {
        "words": m.mean(lengths),
        "distinct_1": m.distinct_n(texts, 1),
        "distinct_2": m.distinct_n(texts, 2),
        "self_bleu": m.self_bleu(texts),
        "repeated_4grams": m.mean(m.repeated_ngrams(t, 4) for t in texts),
        "repeated_lines": m.mean(m.repeated_lines(t) for t in texts),
        "slop_per_1k": m.per_thousand(len(slop), sum(lengths)),
        "slop_found": dict(Counter(slop).most_common(10)),
    }
    if finish is not None:
        out["truncated"] = sum(f == "length" for f in finish) / len(finish)
    if form is not None:
        out["form_rate"] = sum(not forms.check(form, t, variables) for t in texts) / len(texts)
    if target:
        out["length_target"] = target
        out["length_ratio"] = m.mean(n / target for n in lengths)
        out["length_adherence"] = sum(m.length_adherence(n, target) for n in lengths) / len(lengths)
    return out


def run_task(llm, task: str, lang: str, settings: EvalSettings, checks: Checks) -> dict:
    from llmos.engine.generate import ContextError

    case = case_for(task, lang)
    t0 = time.perf_counter()
    head = {"task": task, "lang": lang, "brief": case["brief"], "form": case.get("form"),
            "variables": case.get("variables") or {}}
    try:
        texts, finish, form = write_samples(llm, task, lang, case, settings)
    except ContextError as e:  # a small model's window: the task is left out, the run goes on
        return {**head, "error": str(e), "metrics": {}, "samples": []}
    target = case.get("length") or (case["length_ratio"] * m.length(case["brief"]) if case.get("length_ratio") else None)
    row = text_metrics(texts, finish, target, form, case.get("variables"))
    if checks.copying is not None:
        row.update(copying_metrics(texts, checks.copying))
    if checks.safety is not None:
        row.update(safety_metrics(texts, checks.safety))
    return {**head, "seconds": round(time.perf_counter() - t0, 2), "metrics": row, "samples": texts}


def steps_for(settings: EvalSettings) -> int:
    """Units of work per model, for a progress bar: one per task and language, one for the
    text, one per filled bias prompt."""
    from llmos.eval.bias import probe_size

    return (len(settings.tasks) * len(settings.langs) + (1 if settings.text else 0)
            + (probe_size(settings.langs) if settings.bias else 0))


def evaluate_model(llm, settings: EvalSettings, checks: Checks | None = None, text: str | None = None,
                   step: Callable[[str], None] = lambda what: None) -> dict:
    """Everything measured on one model: {"model", "perplexity"?, "tasks", "summary", "bias"?}."""
    checks = checks or load_checks(settings)
    out: dict = {"model": {"name": llm.name, "precision": llm.loaded.precision,
                           "context_window": llm.context_window, "chat": llm.tokenizer.has_chat_template}}
    if text is not None:
        out["perplexity"] = {"text": str(settings.text), **perplexity(llm, text, settings.window)}
        step("perplexity")
    out["tasks"] = {}
    for task in settings.tasks:
        for lang in settings.langs:
            out["tasks"][f"{task}/{lang}"] = run_task(llm, task, lang, settings, checks)
            step(f"{task}/{lang}")
    out["summary"] = summarise(out, checks)
    if settings.bias:
        from llmos.eval.bias import run_probe

        out["bias"] = run_probe(llm, settings.langs, step=step)
    return out


def summarise(model_report: dict, checks: Checks) -> dict:
    """Each metric's mean over the tasks that measure it, with perplexity and bits per byte;
    a metric a missing library would give says why it is missing."""
    rows = [t["metrics"] for t in model_report["tasks"].values()]
    summary: dict = {}
    ppl = model_report.get("perplexity")
    summary["perplexity"] = ppl["perplexity"] if ppl else None
    summary["bits_per_byte"] = ppl["bits_per_byte"] if ppl else None
    for metric in METRICS[2:]:
        summary[metric.key] = m.mean(r.get(metric.key) for r in rows)
    for key, why in checks.missing.items():
        summary[key] = why
        if key == "copied_share":
            summary["copied_samples"] = why
    return summary


def build_report(models: dict[str, dict], settings: EvalSettings) -> dict:
    return {"llmos_eval": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
            "metrics": {x.key: {"label": x.label, "better": x.better} for x in METRICS},
            "models": models}


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


# --- HTML -----------------------------------------------------------------------------------------

COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f"]


def fmt(value, metric: Metric | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if metric is not None and metric.percent:
        return f"{100 * value:.1f}%"
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def bar_chart(title: str, groups: list[str], series: list[str], values: dict, percent: bool = False,
              note: str = "") -> str:
    """An inline SVG of grouped bars: one group per entry of `groups`, one bar per series
    (model) in its colour; values[(group, series)] is a number or None (no bar). Bars grow from
    zero, up for positive values and down for negative ones."""
    width, height, left, top, bottom = 520, 220, 64, 28, 44
    scale = Metric("", "", None, percent)  # how values are written
    numbers = [v for v in values.values() if isinstance(v, (int, float))]
    hi, lo = max([0.0, *numbers]), min([0.0, *numbers])
    if percent:  # shares on one scale, 0-100%, so that bars compare across plots
        hi = max(hi, 1.0)
    span = (hi - lo) or 1.0
    plot_h = height - top - bottom
    zero_y = top + plot_h * hi / span
    group_w = (width - left - 10) / max(1, len(groups))
    bar_w = min(28.0, group_w * 0.8 / max(1, len(series)))
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" class="chart-title">{html.escape(title)}</text>',
             f'<line x1="{left}" x2="{width - 10}" y1="{zero_y:.1f}" y2="{zero_y:.1f}" stroke="#888"/>']
    for label, y_value in ((fmt(hi, scale), top), (fmt(lo, scale), top + plot_h)):
        parts.append(f'<text x="{left - 4}" y="{y_value + 4:.1f}" text-anchor="end" class="axis">{html.escape(label)}</text>')
    for g, group in enumerate(groups):
        x0 = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for s, name in enumerate(series):
            v = values.get((group, name))
            if not isinstance(v, (int, float)):
                continue
            y = zero_y - plot_h * max(v, 0) / span
            h = max(plot_h * abs(v) / span, 0.5)
            parts.append(f'<rect class="bar" x="{x0 + s * bar_w:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                         f'fill="{COLOURS[s % len(COLOURS)]}" data-model="{html.escape(name)}" data-value="{v:.6g}">'
                         f'<title>{html.escape(name)}, {html.escape(group)}: {fmt(v, scale)}</title></rect>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                     f'class="axis">{html.escape(group)}</text>')
    if note:
        parts.append(f'<text x="{left}" y="{height - 6}" class="axis">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: list[str]) -> str:
    items = "".join(f'<span class="key"><i style="background:{COLOURS[i % len(COLOURS)]}"></i>{html.escape(n)}</span>'
                    for i, n in enumerate(names))
    return f'<p class="legend">{items}</p>'


def _metric_table(caption: str, names: list[str], rows: list[tuple[Metric, list]]) -> str:
    head = "".join(f'<th class="model" data-model="{html.escape(n)}">{html.escape(n)}</th>' for n in names)
    body = []
    for metric, cells in rows:
        numbers = [c for c in cells if isinstance(c, (int, float))]
        best = None
        if metric.better and len(numbers) > 1 and len(set(numbers)) > 1:
            best = (max if metric.better == "higher" else min)(numbers)
        tds = "".join(f'<td class="{"best" if c == best and best is not None else ""}">{html.escape(fmt(c, metric))}</td>'
                      for c in cells)
        arrow = {"higher": " ↑", "lower": " ↓"}.get(metric.better, "")
        body.append(f"<tr><th>{html.escape(metric.label)}{arrow}</th>{tds}</tr>")
    return (f'<table class="metrics"><caption>{html.escape(caption)}</caption><thead><tr><th>metric</th>{head}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table>')


def render_html(report: dict) -> str:
    """The report as one HTML page: no scripts, no outside resources."""
    models = report["models"]
    names = list(models)
    tasks = list(dict.fromkeys(k for r in models.values() for k in r.get("tasks", {})))
    settings = report["settings"]
    out = [f"<h1>llmos eval</h1><p class=\"meta\">{html.escape(report['created'])} · "
           f"{html.escape(', '.join(names))} · {settings['samples']} sample(s) per task, seed {settings['seed']}, "
           f"max tokens {settings['max_tokens'] or 'per task'}, forms "
           f"{'enforced by decoding' if settings['constrained'] else 'asked for, not enforced'}</p>", _legend(names)]

    summary_rows = [(x, [models[n]["summary"].get(x.key) for n in names]) for x in METRICS]
    summary_rows = [(x, cells) for x, cells in summary_rows if any(c is not None for c in cells)]
    out.append("<h2>Summary</h2><p>Task metrics are means over the tasks below; ↑ higher is better, "
               "↓ lower is better, the best value in bold.</p>")
    out.append(_metric_table("all tasks", names, summary_rows))

    out.append("<h2>Plots</h2><div class=\"charts\">")
    for x in METRICS:
        if x.key in ("perplexity", "bits_per_byte"):
            values = {("held-out text", n): models[n]["summary"].get(x.key) for n in names}
            groups = ["held-out text"]
        else:
            values = {(t, n): models[n]["tasks"].get(t, {}).get("metrics", {}).get(x.key) for t in tasks for n in names}
            groups = [t for t in tasks if any(isinstance(values[t, n], (int, float)) for n in names)]
        if any(isinstance(v, (int, float)) for v in values.values()):
            arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(x.better, "")
            out.append(bar_chart(x.label + arrow, groups, names, values, x.percent))
    out.append("</div>")

    out.append("<h2>Per task</h2>")
    for t in tasks:
        first = next(models[n]["tasks"][t] for n in names if t in models[n]["tasks"])
        rows = [(x, [models[n]["tasks"].get(t, {}).get("metrics", {}).get(x.key) for n in names]) for x in METRICS[2:]]
        rows = [(x, cells) for x, cells in rows if any(c is not None for c in cells)]
        brief = first["brief"] if len(first["brief"]) < 120 else first["brief"][:117] + "…"
        out.append(f"<h3>{html.escape(t)}</h3><p class=\"brief\">brief: {html.escape(brief)}"
                   + (f" · form: {html.escape(first['form'])}" if first["form"] else "") + "</p>")
        out.append(_metric_table(t, names, rows))
        for n in names:
            task = models[n]["tasks"].get(t)
            if task and task.get("error"):
                out.append(f"<p class=\"error\">{html.escape(n)}: not run ({html.escape(task['error'])})</p>")
            elif task:
                slop = ", ".join(f"{k} ×{v}" for k, v in task["metrics"].get("slop_found", {}).items()) or "none"
                samples = "".join(f"<pre>{html.escape(s) or '(empty)'}</pre>" for s in task["samples"])
                out.append(f"<details><summary>{html.escape(n)}: {len(task['samples'])} sample(s); slop found: "
                           f"{html.escape(slop)}</summary>{samples}</details>")

    if any("perplexity" in models[n] for n in names):
        out.append("<h2>Held-out text</h2><table class=\"metrics\"><thead><tr><th></th>"
                   + "".join(f'<th class="model">{html.escape(n)}</th>' for n in names) + "</tr></thead><tbody>")
        for key in ("tokens", "bytes", "window", "nll_nats"):
            out.append(f"<tr><th>{key}</th>" + "".join(
                f"<td>{fmt(models[n].get('perplexity', {}).get(key))}</td>" for n in names) + "</tr>")
        out.append("</tbody></table>")

    if any("bias" in models[n] for n in names):
        out.append(_bias_html(models, names))
    style = ("body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ddd;padding:.25em .6em;"
             "text-align:right}th:first-child{text-align:left}caption{text-align:left;color:#666}"
             "td.best{font-weight:bold}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:.3em 0}"
             ".chart{margin:.5em 1em .5em 0;border:1px solid #eee}.chart-title{font-size:13px;font-weight:600}"
             ".axis{font-size:11px;fill:#555}.legend .key{margin-right:1.2em}.legend i{display:inline-block;"
             "width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}.meta,.brief{color:#555}"
             ".charts{display:flex;flex-wrap:wrap}")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>llmos eval: "
            f"{html.escape(', '.join(names))}</title><style>{style}</style></head><body>"
            + "".join(out) + "</body></html>")


def _bias_html(models: dict, names: list[str]) -> str:
    from llmos.eval.bias import MEASURES

    labels = {"sentiment": "sentiment of the continuation (lexicon, -1..1)",
              "neutral_logprob": "log-probability of the neutral continuation (nats)",
              "preference": "log P(positive) − log P(negative) (nats)"}
    out = ["<h2>Bias probe</h2><p>Each value's deviation from its attribute's mean (centred per template, "
           "mean ± sd over templates); the gap is the largest deviation minus the smallest. See docs/eval.md "
           "for the method and its limits: a handful of templates and a crude lexicon, so gaps comparable "
           "to the sd are noise.</p><div class=\"charts\">"]
    langs = list(dict.fromkeys(lang for n in names for lang in models[n].get("bias", {})))
    for lang in langs:
        attrs = list(dict.fromkeys(a for n in names for a in models[n].get("bias", {}).get(lang, {}).get("attributes", {})))
        for measure in MEASURES:
            values = {(a, n): models[n].get("bias", {}).get(lang, {}).get("attributes", {}).get(a, {}).get(measure, {}).get("gap")
                      for a in attrs for n in names}
            out.append(bar_chart(f"{lang}: gap in {labels[measure]}", attrs, names, values))
    out.append("</div>")
    for lang in langs:
        for measure in MEASURES:
            rows = []
            attrs = list(dict.fromkeys(a for n in names for a in models[n].get("bias", {}).get(lang, {}).get("attributes", {})))
            for a in attrs:
                per_model = [models[n].get("bias", {}).get(lang, {}).get("attributes", {}).get(a, {}).get(measure) for n in names]
                values = list(dict.fromkeys(v for p in per_model if p for v in p["values"]))
                gap = "".join(f"<td><b>gap {fmt(p['gap']) if p else '–'}</b></td>" for p in per_model)
                rows.append(f"<tr><th><b>{html.escape(a)}</b></th>{gap}</tr>")
                for v in values:
                    cells = "".join(
                        f"<td>{fmt(p['values'][v]['deviation'])} ± {fmt(p['values'][v]['sd'])}</td>" if p and v in p["values"]
                        else "<td>–</td>" for p in per_model)
                    rows.append(f"<tr><th>&nbsp;&nbsp;{html.escape(v)}</th>{cells}</tr>")
            head = "".join(f'<th class="model">{html.escape(n)}</th>' for n in names)
            out.append(f'<table class="metrics bias"><caption>{html.escape(lang)}: {html.escape(labels[measure])}</caption>'
                       f"<thead><tr><th>attribute / value</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(out)
