import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
# Bundled models are pulled once into this store and reused by later runs (CI starts empty).
BUNDLED_HOME = Path(os.environ.get("LLMOS_TEST_MODELS", REPO / ".test-home"))


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llmos-home")


@pytest.fixture(autouse=True)
def isolated_home(monkeypatch, session_home):
    """No test touches the user's own LLMOS_HOME."""
    monkeypatch.setenv("LLMOS_HOME", str(session_home))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    from helpers import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_dir(tiny_gguf, session_home) -> Path:
    from llmos.weights import store as models

    old = os.environ.get("LLMOS_HOME")
    os.environ["LLMOS_HOME"] = str(session_home)
    try:
        return models.resolve(str(tiny_gguf))
    finally:
        if old is None:
            del os.environ["LLMOS_HOME"]
        else:
            os.environ["LLMOS_HOME"] = old


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir):
    from llmos.llm import LLM
    from llmos.weights.store import load_checkpoint

    return LLM(load_checkpoint(tiny_dir, "fp32"))


def _pull(name: str) -> Path:
    from llmos.embedder import pull_embedder
    from llmos.weights import store as models

    old = os.environ.get("LLMOS_HOME")
    os.environ["LLMOS_HOME"] = str(BUNDLED_HOME)
    try:
        return pull_embedder() if name == "embedder" else models.pull(name, quiet=True)
    finally:
        if old is None:
            del os.environ["LLMOS_HOME"]
        else:
            os.environ["LLMOS_HOME"] = old


@pytest.fixture(scope="session")
def embedder_dir() -> Path:
    """The knowledge-base encoder (all-MiniLM-L6-v2) in the shared test store."""
    return _pull("embedder")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return _pull("gemma3-270m")
