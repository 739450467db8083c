"""Chat: personas, strategies, facts, memory under a budget, sessions across processes, the REPL
through a pseudo-terminal. The tiny random model writes the replies (their words are noise; the
mechanics are what is checked), except where a test needs a reply with words in it: its chat replies
are newlines only, so those use the bundled SmolLM2."""

import codecs
import fcntl
import json
import os
import signal
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

from helpers import assert_clean_error, llmos
from llmos.chat import memory, strategies
from llmos.chat.conversation import ChatSettings, Conversation
from llmos.chat.personas import PersonaError, list_personas, load_persona, persona_from_card, read_persona_file, save_persona
from llmos.chat.sessions import SessionError, Sessions
from llmos.db import Store

# -- personas --


def test_builtin_personas_are_valid():
    names = {p["name"] for p in list_personas()}
    assert {"history-teacher", "writing-coach", "support", "assistant"} <= names
    teacher = load_persona("history-teacher")
    assert teacher.greeting and teacher.examples and "farewell" in teacher.strategies
    assert "humorous" in teacher.description or "joke" in teacher.description
    assert "handover" in load_persona("support").strategies


@pytest.mark.parametrize("text, needle", [
    ("name: x\n", "'description' is missing"),
    ("name: x\ndescription: 3\n", "'description' must be a str, got int"),
    ("name: x\ndescription: d\nexamples: [{user: hi}]\n", "examples[0]"),
    ("name: x\ndescription: d\nstrategies: {dance: {}}\n", "unknown strategy 'dance'"),
    ("name: x\ndescription: d\nmood: happy\n", "unknown field(s) mood"),
    ("name: [x\n", "not valid YAML"),
])
def test_bad_persona_files_say_which_field(tmp_path, text, needle):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PersonaError) as e:
        read_persona_file(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_sillytavern_card_imports_as_persona(tmp_path):
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Captain Mira Vey", "description": "{{char}} commands the airship Kestrel.",
        "personality": "dry wit, loyal", "scenario": "A storm over the northern sea.",
        "first_mes": "Welcome aboard, {{user}}.", "mes_example": "<START>\n{{user}}: Where are we headed?\n{{char}}: North, into the weather.",
        "system_prompt": "Stay in character."}}
    path = tmp_path / "mira.json"
    path.write_text(json.dumps(card))
    p = persona_from_card(path)
    assert p.name == "Captain-Mira-Vey"
    assert "Captain Mira Vey commands the airship Kestrel." in p.description and "dry wit" in p.description
    assert p.greeting == "Welcome aboard, you."
    assert p.examples == [{"user": "Where are we headed?", "assistant": "North, into the weather."}]
    save_persona(p)
    assert load_persona("Captain-Mira-Vey").description == p.description


# -- strategies and facts --

STRATEGY_CASES = [
    ("ok, bye for now", "farewell", "en"), ("好的，再见", "farewell", "zh"),
    ("Can I talk to a human please", "handover", "en"), ("我要转人工", "handover", "zh"),
    ("What do you think about the election?", "topic_guard", "en"), ("你觉得这支股票怎么样", "topic_guard", "zh"),
    ("When will my parcel arrive?", None, "en"), ("我的包裹什么时候到？", None, "zh"),
]


@pytest.mark.parametrize("text, fired, lang", STRATEGY_CASES)
def test_each_strategy_fires_on_its_trigger(text, fired, lang):
    support = load_persona("support")
    action = strategies.evaluate(support, text, unhappy_streak=0)
    assert (action.strategy if action else None) == fired
    if action:
        expected = support.strategies[fired]["reply"][lang]
        assert action.reply == expected
        assert action.close == (fired == "farewell") and action.handover == (fired == "handover")


@pytest.mark.parametrize("unhappy", ["This is useless.", "还是不行，太差了"])
def test_handover_after_repeated_unhappiness(unhappy):
    support = load_persona("support")
    assert strategies.evaluate(support, unhappy, unhappy_streak=0) is None  # once is not enough
    action = strategies.evaluate(support, unhappy, unhappy_streak=1)
    assert action.strategy == "handover" and "2 times" in action.reason


def test_strategies_only_fire_when_declared():
    coach = load_persona("writing-coach")  # farewell only
    assert strategies.evaluate(coach, "I want to talk to a human", 0) is None
    assert strategies.evaluate(coach, "bye!", 0).strategy == "farewell"


def test_fact_extraction_in_both_languages():
    assert memory.extract_facts("Hi, my name is Ada Lovelace and my novel is set in Lisbon.") == [
        "The user's name is Ada Lovelace.", "The user's novel is set in Lisbon."]
    assert memory.extract_facts("我叫小明，我的小说设定在唐朝长安") == ["用户名叫小明。", "用户的小说设定在唐朝长安。"]
    assert memory.extract_facts("What a lovely day") == []


# -- conversations --


@pytest.fixture
def sessions(tmp_path):
    return Sessions(Store(tmp_path / "chat.db"))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from llmos.llm import LLM

    return LLM.load(smollm2_dir)


@pytest.mark.bundled
def test_turns_retry_undo_edit_rate(smollm2, sessions):
    # SmolLM2 writes words; the tiny model's chat replies are newlines, which are stored as ""
    conv = Conversation(smollm2, sessions, persona="writing-coach", settings=ChatSettings(max_tokens=6, seed=1))
    reply = "".join(conv.send("my name is Ada"))
    turns = conv.turns()
    assert [t["role"] for t in turns] == ["assistant", "user", "assistant"]  # greeting first
    assert reply.strip() and turns[-1]["content"] == reply.strip()
    assert sessions.facts(conv.id) == ["The user's name is Ada."]

    "".join(conv.retry())
    assert len(conv.turns()) == 3
    everything = sessions.turns(conv.id, include_inactive=True)
    assert len(everything) == 4 and not everything[2]["active"]  # the first reply is kept, replaced

    "".join(conv.edit("my name is Grace"))
    assert [t["content"] for t in conv.turns() if t["role"] == "user"] == ["my name is Grace"]
    conv.rate(4)
    assert sessions.turns(conv.id)[-1]["rating"] == 4
    assert conv.undo() == "my name is Grace"
    assert [t["role"] for t in conv.turns()] == ["assistant"]
    with pytest.raises(SessionError):
        conv.undo()


def test_summary_when_the_budget_is_exceeded_keeps_pinned_facts(tiny_llm, sessions):
    conv = Conversation(tiny_llm, sessions, persona="assistant", settings=ChatSettings(max_tokens=12, budget=400, seed=2))
    conv.pin("The user's novel is set in Lisbon.")
    for i in range(8):
        "".join(conv.send(f"Here is detail number {i} about the lighthouse keeper and the storm."))
        assert conv.last_context.tokens <= conv.budget
    row = sessions.get(conv.id)
    assert row["summary_upto"] > 0 and row["summary"]  # older turns were folded into a summary
    system = conv.last_context.messages[0]["content"]
    assert "The user's novel is set in Lisbon." in system and "Summary of the conversation so far" in system
    assert conv.last_context.messages[-1]["content"].startswith("Here is detail number 7")
    kept = conv.last_context.kept_turns
    assert min(kept) > row["summary_upto"]  # nothing is both summarised and sent verbatim


def test_farewell_closes_and_handover_flags_the_session(tiny_llm, sessions):
    conv = Conversation(tiny_llm, sessions, persona="support", settings=ChatSettings(max_tokens=4))
    assert "".join(conv.send("I need a real person")) == load_persona("support").strategies["handover"]["reply"]["en"]
    row = sessions.get(conv.id)
    assert row["handover"] == 1 and row["status"] == "handed over" and "person" in row["handover_reason"]
    assert "".join(conv.send("再见")).endswith("再见！")
    assert conv.closed


def test_export_and_unknown_session(tiny_llm, sessions):
    conv = Conversation(tiny_llm, sessions, persona="history-teacher", settings=ChatSettings(max_tokens=4))
    "".join(conv.send("Tell me about Rome"))
    md = sessions.export(conv.id, "md")
    assert "**You**: Tell me about Rome" in md and "persona: history-teacher" in md
    record = json.loads(sessions.export(conv.id, "json"))
    assert record["persona_data"]["name"] == "history-teacher" and len(record["turns"]) == 3
    with pytest.raises(SessionError, match="no chat session 999"):
        sessions.get(999)


# -- the command, across processes --


def test_sessions_persist_across_processes(tiny_dir, tmp_path):
    first = llmos("chat", "-m", str(tiny_dir), "--max-tokens", "5", "--seed", "1", "-p", "writing-coach",
                  stdin="hello there\nmy novel is set in Lisbon\n/rate up\n", home=tmp_path)
    assert first.returncode == 0, first.stderr
    listing = llmos("sessions", home=tmp_path)
    assert "writing-coach" in listing.stdout
    second = llmos("chat", "-m", str(tiny_dir), "--session", "1", "--max-tokens", "5", "--show-context",
                   stdin="where is my novel set?\n", home=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "The user's novel is set in Lisbon." in second.stderr  # the pinned fact reached the model
    record = json.loads(llmos("sessions", "export", "1", "--format", "json", home=tmp_path).stdout)
    users = [t["content"] for t in record["turns"] if t["role"] == "user"]
    assert users == ["hello there", "my novel is set in Lisbon", "where is my novel set?"]
    assert [t["role"] for t in record["turns"]] == ["assistant", "user", "assistant"] * 1 + ["user", "assistant"] * 2
    assert [t["rating"] for t in record["turns"] if t["rating"] is not None] == [5]
    assert_clean_error(llmos("chat", "-m", str(tiny_dir), "--session", "77", stdin="hi\n", home=tmp_path), "no chat session 77")
    assert_clean_error(llmos("chat", "-m", str(tiny_dir), "-p", "nobody", stdin="hi\n", home=tmp_path), "unknown persona 'nobody'")
    assert llmos("sessions", "delete", "1", home=tmp_path).returncode == 0
    assert_clean_error(llmos("sessions", "show", "1", home=tmp_path), "no chat session 1")


def test_two_processes_write_the_same_store(tiny_dir, tmp_path):
    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    lines = "".join(f"message {i}\n" for i in range(6))
    procs = [subprocess.Popen([sys.executable, "-m", "llmos", "chat", "-m", str(tiny_dir), "--max-tokens", "3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(lines, timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    rows = Sessions(Store(tmp_path / "llmos.db")).list()
    assert [row["user_turns"] for row in rows] == [6, 6]  # one session each, no message lost


def _controlling_terminal():
    """In the child: a new session whose controlling terminal is the pty (stdin), so that
    Ctrl-C typed into it becomes SIGINT, as in a real terminal (and acted on even when the
    tests run in a shell's background, where SIGINT is ignored and inherited so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """The chat REPL on a pseudo-terminal, as a person would use it."""

    def __init__(self, args, home):
        self.master, slave = pty.openpty()
        env = {**os.environ, "LLMOS_HOME": str(home), "COLUMNS": "120", "TERM": "dumb"}
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True, preexec_fn=_controlling_terminal)
        os.close(slave)
        self.seen = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # characters split across reads

    def _read(self, done, what: str, timeout: float):
        deadline = time.time() + timeout
        while not done():
            if time.time() > deadline:
                raise AssertionError(f"{what} never came; the terminal shows:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.seen += self.decoder.decode(os.read(self.master, 4096))
                except OSError:
                    break

    def read_until(self, text: str, timeout: float = 120) -> str:
        self._read(lambda: text in self.seen, repr(text), timeout)
        head, _, self.seen = self.seen.partition(text)
        return head

    def read_some_text(self, timeout: float = 120):
        """Wait until something other than whitespace is on the screen (a reply has begun)."""
        self._read(lambda: self.seen.strip(), "text", timeout)

    def type(self, line: str):
        os.write(self.master, (line + "\r").encode())

    def interrupt(self):
        os.write(self.master, b"\x03")  # Ctrl-C, as the terminal sends it


def test_repl_through_a_pseudo_terminal(tiny_dir, tmp_path):
    t = Terminal(["-m", str(tiny_dir), "-p", "history-teacher", "--max-tokens", "6", "--seed", "3"], tmp_path)
    try:
        assert "Professor Marsh" in t.read_until("you> ")  # the greeting
        t.type("Who built the pyramids?")
        t.read_until("you> ")
        t.type("/retry")
        t.read_until("you> ")
        t.type("/rate 5")
        assert "rated 5" in t.read_until("you> ")
        t.type("/pin my novel is set in Thebes")
        assert "pinned" in t.read_until("you> ")
        t.type("/frobnicate")
        assert "unknown command /frobnicate" in t.read_until("you> ")
        t.type("/undo")
        assert "took back: Who built the pyramids?" in t.read_until("you> ")
        t.type("goodbye")
        assert "Class dismissed!" in t.read_until("resume with")
        assert t.proc.wait(timeout=60) == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    sessions = Sessions(Store(tmp_path / "llmos.db"))
    row = sessions.list()[0]
    assert row["status"] == "closed"
    turns = sessions.turns(row["id"], include_inactive=True)
    assert [t["content"] for t in turns if t["role"] == "user"] == ["Who built the pyramids?", "goodbye"]
    assert [t["rating"] for t in turns if t["rating"]] == [5]
    assert sessions.facts(row["id"]) == ["my novel is set in Thebes"]


@pytest.mark.bundled
def test_ctrl_c_interrupts_a_reply_and_keeps_the_session(smollm2_dir, tmp_path):
    # SmolLM2, not the tiny random model: that one's chat replies are newlines only (its tied
    # embeddings repeat the template's last token), which the stored reply strips to "", and
    # "" == "" would pass whether or not the partial reply was kept
    t = Terminal(["-m", str(smollm2_dir), "--max-tokens", "4000", "--seed", "1"], tmp_path)  # minutes of reply
    try:
        t.read_until("you> ")
        t.type("tell me a very long story")
        t.read_until("assistant> ")
        t.read_some_text()  # the reply is streaming
        t.interrupt()
        shown = t.read_until(" [interrupted]").replace("\r\n", "\n").replace("^C", "").strip()  # ^C: the echo
        t.read_until("you> ")  # the REPL is still there
        t.type("/exit")
        assert t.proc.wait(timeout=60) == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    sessions = Sessions(Store(tmp_path / "llmos.db"))
    turns = sessions.turns(1)
    assert turns[-1]["role"] == "assistant" and turns[-1]["meta"].get("interrupted")
    assert shown and turns[-1]["content"] == shown  # what was written before Ctrl-C is kept


def test_a_killed_process_loses_no_turn(tmp_path):
    from helpers import write_tiny_gguf

    long_context = write_tiny_gguf(tmp_path / "long.gguf", context=1 << 16)
    t = Terminal(["-m", str(long_context), "--max-tokens", "60000", "--budget", "200"], tmp_path)
    try:
        t.read_until("you> ")
        t.type("a message before the crash")
        t.read_until("assistant> ")
        time.sleep(0.5)
        t.proc.kill()  # SIGKILL mid-reply: no cleanup runs
        t.proc.wait(timeout=30)
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    proc = llmos("sessions", "export", "1", "--format", "json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    turns = json.loads(proc.stdout)["turns"]
    assert [x["content"] for x in turns if x["role"] == "user"] == ["a message before the crash"]
    resumed = llmos("chat", "-m", str(long_context), "--session", "1", "--max-tokens", "3", stdin="still here?\n", home=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
