"""Instruction data: chat transcripts and prompt/completion pairs, rendered the way the model
reads them, with the loss on what the assistant writes only.

A JSONL record is one example:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}
Chat records go through the model's own chat template (a base model's plain "User:/Assistant:"
transcript when it has none); a pair becomes a user turn and an assistant turn for a chat model,
and prompt + completion for a base model. The template is rendered turn by turn, so each
assistant reply, with the end-of-turn marker the template puts after it, is a span of its own:
those tokens carry the loss, the rest only context.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


class SFTError(ValueError):
    """A record that is neither a chat nor a prompt/completion pair, or a template that cannot
    be rendered turn by turn."""


def kind_of(record: dict) -> str | None:
    """'chat', 'pair', 'text' or None (not an example)."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "pair"
    if isinstance(record.get("text"), str):
        return "text"
    return None


def check_record(record: dict, where: str) -> list[dict]:
    """The record's conversation as messages; SFTError naming `where` when it is malformed."""
    kind = kind_of(record)
    if kind == "pair":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise SFTError(f"{where}: a pair needs string 'prompt' and non-empty 'completion' fields")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if kind != "chat":
        raise SFTError(f"{where}: not a chat ('messages') or a pair ('prompt', 'completion'), nor a 'text' record")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise SFTError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SFTError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTError(f"{where}: the conversation has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tokenizer, messages: list[dict], pair: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one example. A base model (no chat template) reads a pair as
    its prompt followed by its completion and end-of-text token."""
    if pair and not tokenizer.has_chat_template:
        prompt, completion = messages[0]["content"], messages[1]["content"]
        head = tokenizer.encode(prompt)
        tail = tokenizer.encode(completion, add_bos=False)
        if tokenizer.eos_id is not None:
            tail.append(tokenizer.eos_id)
        return head + tail, [0] * len(head) + [1] * len(tail)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        whole = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not head.startswith(done) or not whole.startswith(head):
            raise SFTError("the model's chat template does not render a conversation turn by turn, so the "
                           "assistant's tokens cannot be told apart; use prompt/completion records")
        segments += [(head[len(done):], False), (whole[len(head):], True)]
        done = whole
    rest = tokenizer.render_chat(messages, add_generation_prompt=False)
    if rest.startswith(done) and len(rest) > len(done):
        segments.append((rest[len(done):], False))
    ids, mask = [], []
    for k, (text, learn) in enumerate(segments):
        if not text:
            continue
        starts_with_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
        piece = tokenizer.encode(text, add_bos=k == 0 and tokenizer.add_bos and not starts_with_bos)
        ids += piece
        mask += [int(learn)] * len(piece)
    return ids, mask
