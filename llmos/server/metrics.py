"""Prometheus text exposition of the server's counters, gauges and latency histograms."""

from __future__ import annotations

import threading
import time

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value: float):
        self.total += value
        self.n += 1
        for i, b in enumerate(BUCKETS):
            if value <= b:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        for b, c in zip(BUCKETS, self.counts):
            lines.append(f'{name}_bucket{{le="{b}"}} {c}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return lines


def label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, schedulers):
        self.schedulers = schedulers  # () -> the schedulers of the served models
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency, self.ttft = Histogram(), Histogram()
        self.started = time.time()

    def count_request(self, route: str, status: int):
        """A finished HTTP request, by route template (the gate counts every request)."""
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def observe(self, req):
        """A finished generation request: its latency and time to first token."""
        now = time.monotonic()
        with self.lock:
            t = req.timings
            self.latency.observe((t.finished_at or now) - t.submitted)
            if t.first_token_at:
                self.ttft.observe(t.first_token_at - t.submitted)

    def render(self) -> str:
        schedulers = self.schedulers()
        s = {k: sum(x.stats[k] for x in schedulers) for k in ("requests", "prompt_tokens", "generated_tokens", "steps", "rejected")}
        queued, running = sum(x.queue_depth for x in schedulers), sum(x.running for x in schedulers)
        lines = ["# TYPE llmos_requests_total counter"]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'llmos_requests_total{{path="{label(path)}",status="{status}"}} {n}')
            lines += [
                "# TYPE llmos_generation_requests_total counter", f"llmos_generation_requests_total {s['requests']}",
                "# TYPE llmos_prompt_tokens_total counter", f"llmos_prompt_tokens_total {s['prompt_tokens']}",
                "# TYPE llmos_generation_tokens_total counter", f"llmos_generation_tokens_total {s['generated_tokens']}",
                "# TYPE llmos_rejected_requests_total counter", f"llmos_rejected_requests_total {s['rejected']}",
                "# TYPE llmos_decode_steps_total counter", f"llmos_decode_steps_total {s['steps']}",
                "# TYPE llmos_queue_depth gauge", f"llmos_queue_depth {queued}",
                "# TYPE llmos_running_sequences gauge", f"llmos_running_sequences {running}",
                "# TYPE llmos_batch_rows gauge", f"llmos_batch_rows {sum(x.max_batch for x in schedulers)}",
                "# TYPE llmos_tokens_in_flight gauge",
                f"llmos_tokens_in_flight {sum(x.tokens_in_flight for x in schedulers)}",
                "# TYPE llmos_uptime_seconds gauge", f"llmos_uptime_seconds {time.time() - self.started:.1f}",
            ]
            lines += self.latency.render("llmos_request_latency_seconds")
            lines += self.ttft.render("llmos_time_to_first_token_seconds")
        return "\n".join(lines) + "\n"
