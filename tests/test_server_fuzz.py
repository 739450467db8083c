"""Property-based fuzzing of every route in the server's OpenAPI schema (Schemathesis, on
Hypothesis): requests generated from the schema, valid and invalid, against a real server on
127.0.0.1. None may be answered with a 5xx, and every 4xx carries an error object: OpenAI's, or,
on the KoboldCpp and Ollama routes, their own (what their front ends read).

The routes that start jobs on this machine's files (prepare, train, n-gram, export) and the one
that downloads a model are left out: a fuzzer would have them write wherever a random path
points. Their bad input is tested in tests/test_server_routes.py.
"""

import os
from collections import Counter
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from helpers import ServerThread, home_with_embedder

KEY = "fuzz-key"
EXCLUDED = r"^/api/(prepare|train|ngram|export|pull/.*|jobs/.*)$"
EXAMPLES = int(os.environ.get("LLMOS_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_home(tmp_path_factory, embedder_dir):
    return home_with_embedder(tmp_path_factory.mktemp("fuzz-home"), embedder_dir)


@pytest.fixture(scope="module")
def fuzz_server(tiny_llm, fuzz_home):
    from llmos.db import Store
    from llmos.server.app import create_app

    app = create_app(tiny_llm, api_key=KEY, store=Store(fuzz_home / "llmos.db"), multilingual=None, max_len=64,
                     max_tokens=32, max_batch=4, max_queue=64)
    s = ServerThread(app)
    yield s
    s.stop()


def operations(fuzz_server):
    import httpx

    spec = httpx.get(fuzz_server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=120).json()
    schema = schemathesis.openapi.from_dict(spec).exclude(path_regex=EXCLUDED)
    ops = [result.ok() for result in schema.get_all_operations()]
    kept = [(path, method) for path, item in spec["paths"].items() for method in item if not re.match(EXCLUDED, path)]
    assert len(ops) == len(kept) > 30  # every route of the schema but the excluded ones
    return ops


KOBOLD = r"^/api/(v1|extra)/"
OLLAMA = r"^/api/(generate|chat|tags|show|version)$"


def error_text(path: str, body) -> str:
    """The message of a 4xx body in the shape its route answers in (the gate answers in the shape
    of the route a request is for; FastAPI's own 404 and 405, before any route, in OpenAI's)."""
    if "error" in body and isinstance(body["error"], dict):
        assert body["error"]["type"], body
        return body["error"]["message"]
    if re.match(KOBOLD, path):
        assert body["detail"]["type"], body
        return body["detail"]["msg"]
    assert re.match(OLLAMA, path), (path, body)
    return body["error"]


def test_no_route_answers_5xx(fuzz_server, fuzz_home, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(fuzz_home))  # the server's books, personas and knowledge bases
    ops = operations(fuzz_server)
    calls = []

    def check(case):
        response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        calls.append(response.status_code)
        assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
        if 400 <= response.status_code < 500:
            assert error_text(case.path, response.json()), response.text[:500]

    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):  # requests that fit the schema, and not
            run = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                           suppress_health_check=list(HealthCheck))(given(case=op.as_strategy(mode))(check))
            try:
                run()
            except Unsatisfiable:  # a route with nothing to break (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, op.label
    print("statuses:", dict(Counter(calls)))
    assert len(calls) >= len(ops) * 10
    assert sum(200 <= c < 300 for c in calls) > len(ops) * 2  # many requests get through, not only refusals
    assert fuzz_server.server.config.app.state.scheduler.thread.is_alive()
