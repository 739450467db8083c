"""The `llmos` command, run as a real process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BUNDLED_HOME
from helpers import assert_clean_error, llmos


def test_generate_json(tiny_dir, session_home):
    proc = llmos("generate", "the cat", "-m", str(tiny_dir), "--max-tokens", "8", "-n", "2",
                 "--seed", "3", "--temperature", "0.9", "--logprobs", "2", "--json", home=session_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["completions"]) == 2
    for c in data["completions"]:
        assert len(c["tokens"]) == 8 and c["finish_reason"] == "length"
        assert len(c["logprobs"]) == 8 and len(c["logprobs"][0]["top"]) == 2
    t = data["timings"]
    for key in ("prompt_tokens", "time_to_first_token_s", "decode_tok_s", "load_s"):
        assert key in t
    again = llmos("generate", "the cat", "-m", str(tiny_dir), "--max-tokens", "8", "-n", "2",
                  "--seed", "3", "--temperature", "0.9", "--json", home=session_home)
    assert [c["text"] for c in json.loads(again.stdout)["completions"]] == [c["text"] for c in data["completions"]]


def test_generate_streams_text_and_beams(tiny_dir, session_home):
    proc = llmos("generate", "the", "-m", str(tiny_dir), "--max-tokens", "5", "--temperature", "0", home=session_home)
    assert proc.returncode == 0 and proc.stdout.startswith("the")
    proc = llmos("generate", "the", "-m", str(tiny_dir), "--max-tokens", "5", "--beams", "3", "-n", "2", home=session_home)
    assert proc.returncode == 0 and proc.stdout.count("--- beam") == 2


def test_gguf_path_is_converted_once(tiny_gguf, tmp_path):
    proc = llmos("generate", "hi", "-m", str(tiny_gguf), "--max-tokens", "3", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").exists()
    models = llmos("models", "--json", home=tmp_path)
    assert converted[0].name in [r["name"] for r in json.loads(models.stdout)]


def test_write_with_a_chat_model(tiny_dir, session_home):
    proc = llmos("write", "poem", "the sea", "-m", str(tiny_dir), "--max-tokens", "6", "--json", home=session_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "the sea" in data["prompt"] and "<|im_start|>" in data["prompt"]
    assert data["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")  # the model's chat template, ready to answer
    assert [len(c["tokens"]) for c in data["completions"]] == [6]  # --max-tokens over the task's preset


@pytest.mark.parametrize("args, needles", [
    (["generate", "hi", "-m", "no-such-model"], ["unknown model", "smollm2-135m-instruct", "gemma3-270m"]),
    (["generate", "hi", "--temperature", "-1"], ["temperature must be >= 0"]),
    (["generate", "hi", "--top-p", "1.5"], ["top_p must be in (0, 1]"]),
    (["generate", "hi", "--top-p", "0"], ["top_p"]),
    (["write", "sonnetz", "x"], ["unknown task", "poem", "story"]),
    (["write", "poem", "x", "--var", "novalue"], ["KEY=VALUE"]),
])
def test_bad_input_is_a_clean_error(args, needles, tiny_dir, session_home):
    if "-m" not in args:
        args = [*args, "-m", str(tiny_dir)]
    assert_clean_error(llmos(*args, home=session_home), *needles)


def test_prompt_longer_than_context(tiny_dir, session_home):
    proc = llmos("generate", "-", "-m", str(tiny_dir), stdin="the " * 700, home=session_home)
    assert_clean_error(proc, "context window")
    proc = llmos("generate", "-", "-m", str(tiny_dir), "--truncate", "left", "--max-tokens", "3",
                 stdin="the " * 700, home=session_home)
    assert proc.returncode == 0, proc.stderr


def test_corrupt_and_unsupported_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(2000))
    assert_clean_error(llmos("generate", "hi", "-m", str(bad), home=tmp_path), "not a readable GGUF")
    import gguf

    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "bloom")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(llmos("generate", "hi", "-m", str(other), home=tmp_path), "not supported", "llama")
    assert not [p for p in (tmp_path / "models").glob("*") if not p.name.endswith(".partial")]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_clean_error(llmos("generate", "hi", "-m", str(text), home=tmp_path), ".gguf")


def test_ctrl_c_stops_cleanly(tiny_dir, session_home):
    env = {**os.environ, "LLMOS_HOME": str(session_home)}
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "generate", "the", "-m", str(tiny_dir),
                             "--max-tokens", "100000", "--truncate", "left"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    time.sleep(0.5)
    first = proc.stdout.read(3)  # generation has started
    assert first
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "stopped" in stderr


@pytest.mark.bundled
def test_bundled_end_to_end(smollm2_dir):
    """The README's tour, with the default model."""
    proc = llmos("write", "poem", "the sea at night", "--max-tokens", "60", "--seed", "1", home=BUNDLED_HOME)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 10
    args = ("generate", "Once upon a time", "-n", "3", "--temperature", "0.9", "--seed", "7", "--max-tokens", "20", "--json")
    a, b = llmos(*args, home=BUNDLED_HOME), llmos(*args, home=BUNDLED_HOME)
    texts = [c["text"] for c in json.loads(a.stdout)["completions"]]
    assert texts == [c["text"] for c in json.loads(b.stdout)["completions"]]
    assert len(set(texts)) == 3
    listing = llmos("models", home=BUNDLED_HOME)
    assert "smollm2-135m-instruct" in listing.stdout and "apache-2.0" in listing.stdout


@pytest.mark.bundled
def test_chinese_runs_on_the_multilingual_model_by_default(smollm2_dir, gemma3_dir, tmp_path):
    """One rule on every default path: Chinese with no model named goes to gemma3-270m."""
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(BUNDLED_HOME / "models", home / "models")
    zh = json.loads(llmos("generate", "秋天的夜晚", "--max-tokens", "4", "--json", home=home).stdout)
    en = json.loads(llmos("generate", "An autumn night", "--max-tokens", "4", "--json", home=home).stdout)
    assert zh["model"] == "gemma3-270m" and en["model"] == "smollm2-135m-instruct"
    named = json.loads(llmos("generate", "秋天", "-m", "smollm2-135m-instruct", "--max-tokens", "2", "--json",
                             home=home).stdout)
    assert named["model"] == "smollm2-135m-instruct"
    persona = tmp_path / "laoshi.yaml"
    persona.write_text("name: laoshi\ndescription: 一位耐心的语文老师。\nlanguage: zh\n", encoding="utf-8")
    chat = llmos("chat", "--persona", str(persona), "--max-tokens", "8", stdin="你好\n", home=home)
    assert chat.returncode == 0, chat.stderr
    from llmos.chat.sessions import Sessions
    from llmos.db import Store

    (session,) = Sessions(Store(home / "llmos.db")).list()
    assert session["model"] == "gemma3-270m" and session["persona"] == "laoshi"
    again = llmos("chat", "--session", str(session["id"]), "--max-tokens", "4", stdin="再说一句\n", home=home)
    assert again.returncode == 0, again.stderr
    assert Sessions(Store(home / "llmos.db")).get(session["id"])["model"] == "gemma3-270m"
