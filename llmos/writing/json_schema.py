"""JSON output kept by masking tokens: a checker and a token-level machine side by side.

`json_constraint(llm, schema)` fulfils the engine's constraint contract (start, mask, advance):
at every step only the tokens that keep the text a prefix of a JSON value satisfying `schema`
may be drawn, the stop tokens only once the value is complete, and then nothing else. A schema
of None means any JSON object (Ollama's `format: "json"`). `validate(value, schema)` lists what a
parsed value breaks, for the same subset of JSON Schema:

- type: object, array, string, number, integer, boolean, null, or a list of these
- properties, required, additionalProperties (false, true or a schema)
- items, minItems, maxItems; enum, const; anyOf; $ref to the schema's own $defs (or any
  "#/..." pointer into it; a schema may refer to itself)
- annotations (title, description, default, examples, $schema, $id, $comment) are ignored;
  any other keyword is a SchemaError that names it.

What is generated is a subset of what the schema allows: properties come in the order they are
declared (optional ones may be left out), a schema with properties gets no others unless
additionalProperties is a schema or true and no properties are declared, whitespace between
tokens is bounded (4 characters per level of nesting, plus 2) so the model cannot loop on spaces,
numbers have at most 16 digits before and after the point and 2 in the exponent, and free values
(any JSON) nest at most 16 deep. A token budget can still end the text mid-value (finish reason
"length"): the output is then incomplete JSON, as with Ollama.

The machine works on characters. A state is a frozenset of stacks (anyOf and number endings
branch); a stack is a tuple of frames, one per open value. Masks are computed per stack by walking
the vocabulary's texts in sorted order, descending only by characters the stack can take, and
cached; inside a free string every token free of quotes, backslashes and control characters is
allowed at once from a precomputed list.
"""

from __future__ import annotations

import json
import re
import threading
from bisect import bisect_left
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch

from llmos.writing.tokens import TokenTable, token_table, utf8_length


class SchemaError(ValueError):
    pass


ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "$defs", "definitions"}  # definitions are read where a $ref points into them
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_DIGITS, MAX_EXPONENT, MAX_DEPTH = 16, 2, 16  # 2 exponent digits: no number overflows to inf
WHITESPACE = " \t\n\r"
# Every character a stack outside a string can take: structure, numbers and true/false/null.
JSON_CHARS = frozenset(WHITESPACE + '{}[],:"-+.eE0123456789truefalsn')
HEX = frozenset("0123456789abcdefABCDEF")
ESCAPES = frozenset('"\\/bfnrt')


# --- schema -> nodes -------------------------------------------------------------------------


class Node:
    """A compiled schema. Nodes are compared by identity, which keeps machine states small."""

    __slots__ = ("kind", "props", "additional", "items", "min", "max", "integer", "texts", "options")

    def __init__(self, kind: str, **fields):
        self.kind = kind
        for name in self.__slots__[1:]:
            setattr(self, name, fields.get(name))


STRING, NUMBER, INTEGER = Node("string"), Node("number", integer=False), Node("number", integer=True)
BOOLEAN, NULL = Node("enum", texts=("true", "false")), Node("enum", texts=("null",))
ANY = Node("any")
ANY_OBJECT = Node("object", props=(), additional=ANY)
ANY_ARRAY = Node("array", items=ANY, min=0, max=None)

KEYWORDS = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "minItems", "maxItems"},
}


class Refs:
    """The root schema (for "$ref": "#/$defs/Name") and the nodes made for each reference, so
    that a schema that refers to itself becomes a machine that loops."""

    def __init__(self, root):
        self.root, self.nodes = root, {}

    def resolve(self, ref, where: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}.$ref {ref!r}: only references inside the schema (#/$defs/Name) are supported")
        target = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}.$ref {ref!r} points to nothing in the schema")
            target = target[part]
        return target


def resolve_ref(schema: dict, refs: Refs, where: str) -> Node:
    ref = schema["$ref"]
    node = refs.nodes.get(ref)
    if node is None:
        node = refs.nodes[ref] = Node("pending")  # filled below; a reference back to it loops
        real = compile_schema(refs.resolve(ref, where), f"{where}.$ref", refs)
        if real in (STRING, NUMBER, INTEGER, BOOLEAN, NULL, ANY, ANY_OBJECT, ANY_ARRAY):
            refs.nodes[ref] = real  # shared nodes have no children, so nothing refers to the placeholder
            return real
        for name in Node.__slots__:
            setattr(node, name, getattr(real, name))
    return node


def compile_schema(schema: dict | bool | None, where: str = "schema", refs: Refs | None = None) -> Node:
    """The node that generates values of `schema` (None: any JSON object)."""
    if refs is None:
        refs = Refs(schema)
    if schema is None:
        return ANY_OBJECT
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be a JSON object (a dict), got {schema!r}")
    keys = set(schema) - ANNOTATIONS
    if "$ref" in keys:
        _reject(keys, {"$ref"}, where)
        return resolve_ref(schema, refs, where)
    if "enum" in keys or "const" in keys:
        return _compile_enum(schema, keys, where)
    if "anyOf" in keys:
        extra = keys - {"anyOf"}
        if extra:
            raise SchemaError(f"{where}: anyOf beside {sorted(extra)[0]!r} is not supported; "
                              f"move {sorted(extra)[0]!r} into each anyOf branch")
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{where}.anyOf must be a non-empty list of schemas")
        return _union([compile_schema(s, f"{where}.anyOf[{i}]", refs) for i, s in enumerate(options)])
    kind = schema.get("type")
    if kind is None:
        kind = "object" if keys & KEYWORDS["object"] else "array" if keys & KEYWORDS["array"] else None
        if kind is None:
            _reject(keys, set(), where)
            return ANY
    if isinstance(kind, list):
        if not kind or any(k not in TYPES for k in kind):
            raise SchemaError(f"{where}.type must name types among {', '.join(TYPES)}, got {kind!r}")
        _reject(keys, {"type"} | KEYWORDS["object"] | KEYWORDS["array"], where)
        return _union([compile_schema({key: v for key, v in schema.items() if key in KEYWORDS.get(k, ()) or key == "type"}
                                      | {"type": k}, where, refs) for k in dict.fromkeys(kind)])
    if kind not in TYPES:
        raise SchemaError(f"{where}.type {kind!r} is not a JSON Schema type; use one of {', '.join(TYPES)}")
    if kind == "object":
        return _compile_object(schema, keys, where, refs)
    if kind == "array":
        return _compile_array(schema, keys, where, refs)
    _reject(keys, {"type"}, where)
    return {"string": STRING, "number": NUMBER, "integer": INTEGER, "boolean": BOOLEAN, "null": NULL}[kind]


def _reject(keys: set, allowed: set, where: str):
    unknown = sorted(keys - allowed)
    if unknown:
        raise SchemaError(f"{where}: keyword {unknown[0]!r} is not supported by JSON output "
                          f"(supported: type, properties, required, additionalProperties, items, "
                          f"minItems, maxItems, enum, const, anyOf, $ref); remove it from the schema")


def _compile_object(schema: dict, keys: set, where: str, refs: Refs) -> Node:
    _reject(keys, KEYWORDS["object"], where)
    props = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(props, dict):
        raise SchemaError(f"{where}.properties must be an object mapping names to schemas")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(f"{where}.required must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        raise SchemaError(f"{where}.required names {missing[0]!r}, which is not in properties; "
                          f"declare it under properties")
    extra = schema.get("additionalProperties", None if props else True)
    if extra is True:
        extra = {}
    if extra is False:
        additional = None
    elif extra is None:
        additional = None  # properties declared: only those are written
    elif props:
        additional = None  # a free key could repeat a declared name with another value
    else:
        additional = compile_schema(extra, f"{where}.additionalProperties", refs)
    compiled = tuple(
        (json.dumps(name, ensure_ascii=False), compile_schema(sub, f"{where}.properties.{name}", refs), name in required)
        for name, sub in props.items()
    )
    return Node("object", props=compiled, additional=additional)


def _compile_array(schema: dict, keys: set, where: str, refs: Refs) -> Node:
    _reject(keys, KEYWORDS["array"], where)
    lo, hi = schema.get("minItems", 0), schema.get("maxItems")
    for name, value in (("minItems", lo), ("maxItems", hi)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaError(f"{where}.{name} must be a whole number >= 0, got {value!r}")
    if hi is not None and hi < lo:
        raise SchemaError(f"{where}: maxItems ({hi}) is below minItems ({lo})")
    items = schema.get("items", {})
    if isinstance(items, list):
        raise SchemaError(f"{where}.items must be one schema (tuple items are not supported)")
    return Node("array", items=compile_schema(items, f"{where}.items", refs), min=lo, max=hi)


def _compile_enum(schema: dict, keys: set, where: str) -> Node:
    _reject(keys, {"enum", "const", "type"}, where)
    values = [schema["const"]] if "const" in schema else schema["enum"]
    if not isinstance(values, list) or not values:
        raise SchemaError(f"{where}.enum must be a non-empty list of values")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        values = [v for v in values if any(_is_type(v, t) for t in types)]
        if not values:
            raise SchemaError(f"{where}: no enum value has type {schema['type']!r}")
    texts = tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values))
    return Node("enum", texts=texts)


def _union(nodes: list[Node]) -> Node:
    return nodes[0] if len(nodes) == 1 else Node("union", options=tuple(nodes))


# --- the checker -----------------------------------------------------------------------------


def _is_type(value, kind: str) -> bool:
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}[kind])


def _equal(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if _is_type(a, "number") and _is_type(b, "number"):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def validate(value, schema: dict | None, where: str = "$") -> list[str]:
    """What `value` (parsed JSON) breaks of `schema` (None: any object), as messages; [] if valid.
    The schema must be in the supported subset (compile_schema raises SchemaError otherwise)."""
    compile_schema(schema)
    return _check(value, {"type": "object"} if schema is None else schema, where, Refs(schema))


def _check(value, schema, where: str, refs: Refs) -> list[str]:
    if schema is True or schema == {} or not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        return _check(value, refs.resolve(schema["$ref"], where), where, refs)
    if "const" in schema and not _equal(value, schema["const"]):
        return [f"{where}: {value!r} is not {schema['const']!r}"]
    if "enum" in schema and not any(_equal(value, v) for v in schema["enum"]):
        return [f"{where}: {value!r} is not one of {schema['enum']!r}"]
    if "anyOf" in schema:
        if all(_check(value, s, where, refs) for s in schema["anyOf"]):
            return [f"{where}: {value!r} matches no anyOf branch"]
        return []
    kind = schema.get("type")
    if kind is None:
        kind = "object" if "properties" in schema or "required" in schema else "array" if "items" in schema else None
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, k) for k in kinds):
            return [f"{where}: {value!r} is not of type {kind!r}"]
    problems = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where}: required property {name!r} is missing")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                problems += _check(item, props[name], f"{where}.{name}", refs)
            elif extra is False:
                problems.append(f"{where}: property {name!r} is not allowed")
            else:
                problems += _check(item, extra, f"{where}.{name}", refs)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{where}: {len(value)} items, fewer than minItems {schema['minItems']}")
        if schema.get("maxItems") is not None and len(value) > schema["maxItems"]:
            problems.append(f"{where}: {len(value)} items, more than maxItems {schema['maxItems']}")
        for i, item in enumerate(value):
            problems += _check(item, schema.get("items", {}), f"{where}[{i}]", refs)
    return problems


# --- the character machine -------------------------------------------------------------------
# Frames (tuples):
#   ("r", node)                    the start: a value of node, not yet begun
#   ("o", node, phase, next_property, current_property, whitespace)  an object
#   ("a", node, phase, count, whitespace)                            an array
#   ("s", pending_bytes, escape)   a free string after its opening quote; pending_bytes: the
#                                  start of a character split over tokens; escape: 0 none,
#                                  1 after a backslash, 2-5 hex digits of \uXXXX still to read + 1
#   ("n", integer, phase, digits)  a number
#   ("e", texts, position)         one of some literal texts (enum, const, true/false/null)
#   ("k", ((text, index), ...), position)  a declared property name

O_START, O_KEY, O_COLON, O_VALUE, O_NEXT = range(5)  # after "{", after ",", after a key, after ":", after a value
A_START, A_ITEM, A_NEXT = range(3)  # after "[", after ",", after a value
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
N_DONE = (N_ZERO, N_INT, N_FRAC, N_EXP)  # a number may end here
PLAIN_STRING = ("s", b"", 0)


def _reachable(node: Node, i: int):
    """Declared properties that may come next: from i on, up to and including the first required one."""
    for j in range(i, len(node.props)):
        yield j
        if node.props[j][2]:
            return


def _may_close(node: Node, i: int) -> bool:
    return not any(p[2] for p in node.props[i:])


def _done(rest: tuple, key: int | None = None) -> tuple:
    """The stack once the value (or key) on top of `rest` is complete."""
    if not rest:
        return ()
    p = rest[-1]
    if p[0] == "o":
        if p[2] in (O_START, O_KEY):
            top = ("o", p[1], O_COLON, p[3] if key is None else key + 1, -1 if key is None else key, 0)
        else:
            top = ("o", p[1], O_NEXT, p[3], p[4], 0)
    else:
        top = ("a", p[1], A_NEXT, p[3] + 1, 0)
    return rest[:-1] + (top,)


def _begin(node: Node, ch: str, stack: tuple) -> list[tuple]:
    """Stacks after the first character `ch` of a value of `node` on top of `stack`."""
    kind = node.kind
    if kind == "object":
        if ch == "{" and (node is not ANY_OBJECT or len(stack) < MAX_DEPTH):
            return [stack + (("o", node, O_START, 0, -1, 0),)]
    elif kind == "array":
        if ch == "[" and (node is not ANY_ARRAY or len(stack) < MAX_DEPTH):
            return [stack + (("a", node, A_START, 0, 0),)]
    elif kind == "string":
        if ch == '"':
            return [stack + (PLAIN_STRING,)]
    elif kind == "number":
        phase = N_SIGN if ch == "-" else N_ZERO if ch == "0" else N_INT if "1" <= ch <= "9" else None
        if phase is not None:
            return [stack + (("n", node.integer, phase, int(phase != N_SIGN)),)]
    elif kind == "enum":
        texts = tuple(t for t in node.texts if t[0] == ch)
        if texts:
            return [_literal(stack, "e", texts, 1)]
    elif kind == "any":
        out = []
        for option in (ANY_OBJECT, ANY_ARRAY, STRING, NUMBER, BOOLEAN, NULL):
            out += _begin(option, ch, stack)
        return out
    elif kind == "union":
        out = []
        for option in node.options:
            out += _begin(option, ch, stack)
        return out
    return []


def _literal(stack: tuple, tag: str, texts: tuple, pos: int) -> tuple:
    """A literal frame, or the completed value when the only text left is fully written."""
    if len(texts) == 1:
        text = texts[0] if tag == "e" else texts[0][0]
        if len(text) == pos:
            return _done(stack, None if tag == "e" else texts[0][1])
    return stack + ((tag, texts, pos),)


def _complete(frame: tuple) -> bool:
    """Whether the number or literal on top may end before the next character."""
    if frame[0] == "n":
        return frame[2] in N_DONE
    if frame[0] in "ek":
        return any(len(t if frame[0] == "e" else t[0]) == frame[2] for t in frame[1])
    return False


def step(stack: tuple, ch: str) -> list[tuple]:
    """The stacks after one character (none: the character breaks the value)."""
    if not stack:
        return []
    top, rest = stack[-1], stack[:-1]
    tag = top[0]
    if tag == "r":
        return _begin(top[1], ch, rest)
    if tag == "s":
        _, pending, esc = top
        if pending:
            return []
        if esc == 0:
            if ch == '"':
                return [_done(rest)]
            if ch == "\\":
                return [rest + (("s", b"", 1),)]
            return [] if ch < " " else [stack]
        if esc == 1:
            if ch in ESCAPES:
                return [rest + (PLAIN_STRING,)]
            return [rest + (("s", b"", 5),)] if ch == "u" else []
        if ch in HEX:
            return [rest + (("s", b"", 0 if esc == 2 else esc - 1),)]
        return []
    if tag == "o":
        return _step_object(top, rest, ch)
    if tag == "a":
        return _step_array(top, rest, ch)
    out = []
    if tag == "n":
        out = _step_number(top, rest, ch)
    else:  # "e", "k": literals
        texts = tuple(t for t in top[1] if len(t if tag == "e" else t[0]) > top[2]
                      and (t if tag == "e" else t[0])[top[2]] == ch)
        if texts:
            out = [_literal(rest, tag, texts, top[2] + 1)]
    if _complete(top):  # the number or literal ends; the character belongs to what follows
        out += step(_done(rest, next((t[1] for t in top[1] if len(t[0]) == top[2]), None) if tag == "k" else None), ch)
    return out


def _gap(top: tuple, stack: tuple, ch: str, ws_index: int) -> list[tuple] | None:
    """Whitespace between tokens, at most 4 per level of nesting plus 2 in one gap."""
    if ch in WHITESPACE:
        if top[ws_index] < 4 * (len(stack) + 1) + 2:
            return [stack + (top[:ws_index] + (top[ws_index] + 1,),)]
        return []
    return None


def _step_object(top: tuple, rest: tuple, ch: str) -> list[tuple]:
    _, node, phase, i, cur, _ = top
    if phase != O_COLON and (ws := _gap(top, rest, ch, 5)) is not None:
        return ws
    here = rest + (top[:5] + (0,),)  # this frame below a child, its whitespace count reset
    if phase in (O_START, O_KEY):
        if ch == "}" and phase == O_START and _may_close(node, i):
            return [_done(rest)]
        if ch == '"':
            out = []
            keys = tuple((node.props[j][0], j) for j in _reachable(node, i))
            if keys:
                out.append(_literal(here, "k", keys, 1))
            if node.additional is not None:
                out.append(here + (PLAIN_STRING,))
            return out
        return []
    if phase == O_COLON:
        return [rest + (("o", node, O_VALUE, i, cur, 0),)] if ch == ":" else []
    if phase == O_VALUE:
        return _begin(node.additional if cur < 0 else node.props[cur][1], ch, here)
    # O_NEXT
    if ch == "," and (node.additional is not None or i < len(node.props)):
        return [rest + (("o", node, O_KEY, i, -1, 0),)]
    if ch == "}" and _may_close(node, i):
        return [_done(rest)]
    return []


def _step_array(top: tuple, rest: tuple, ch: str) -> list[tuple]:
    _, node, phase, count, _ = top
    if (ws := _gap(top, rest, ch, 4)) is not None:
        return ws
    if phase == A_NEXT:
        if ch == "," and (node.max is None or count < node.max):
            return [rest + (("a", node, A_ITEM, count, 0),)]
        if ch == "]" and count >= node.min:
            return [_done(rest)]
        return []
    if ch == "]" and phase == A_START and node.min == 0:
        return [_done(rest)]
    if node.max is not None and count >= node.max:
        return []
    return _begin(node.items, ch, rest + (("a", node, phase, count, 0),))


def _step_number(top: tuple, rest: tuple, ch: str) -> list[tuple]:
    _, integer, phase, digits = top
    digit = "0" <= ch <= "9"

    def to(p, d):
        return [rest + (("n", integer, p, d),)]

    if phase == N_SIGN:
        return to(N_ZERO, 1) if ch == "0" else to(N_INT, 1) if digit else []
    if phase == N_INT and digit:
        return to(N_INT, digits + 1) if digits < MAX_DIGITS else []
    if phase in (N_ZERO, N_INT) and not integer:
        return to(N_DOT, 0) if ch == "." else to(N_E, 0) if ch in "eE" else []
    if phase == N_DOT:
        return to(N_FRAC, 1) if digit else []
    if phase == N_FRAC:
        if digit:
            return to(N_FRAC, digits + 1) if digits < MAX_DIGITS else []
        return to(N_E, 0) if ch in "eE" else []
    if phase == N_E:
        return to(N_ESIGN, 0) if ch in "+-" else to(N_EXP, 1) if digit else []
    if phase == N_ESIGN:
        return to(N_EXP, 1) if digit else []
    if phase == N_EXP and digit:
        return to(N_EXP, digits + 1) if digits < MAX_EXPONENT else []
    return []


def next_chars(stack: tuple) -> frozenset | None:
    """A superset of the characters `stack` can take next (None: nearly any, inside a string)."""
    if not stack:
        return frozenset()
    top = stack[-1]
    if top[0] == "s":
        if top[1]:
            return frozenset()  # a character split over tokens is being finished
        return None if top[2] == 0 else ESCAPES | {"u"} if top[2] == 1 else HEX
    if top[0] in "ek":
        chars = {(t if top[0] == "e" else t[0])[top[2]] for t in top[1] if len(t if top[0] == "e" else t[0]) > top[2]}
        return frozenset(chars) | JSON_CHARS if _complete(top) else frozenset(chars)
    return JSON_CHARS


def accepts(stack: tuple) -> bool:
    """Whether the text may end here: the value is complete."""
    return not stack or (len(stack) == 1 and _complete(stack[0]))


# --- the vocabulary and the token machine ----------------------------------------------------


def _valid_start(b: bytes) -> bool:
    """Whether `b` begins (or is) one well-formed UTF-8 character: decoders turn anything else,
    and bytes around it, into replacement characters."""
    n = utf8_length(b[0])
    try:
        return 0 < len(b) <= n and len((b + b"\x80" * (n - len(b))).decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


_UP_TO_SPECIAL = re.compile(r'.*["\\\x00-\x1f]', re.S)  # a text up to its last special character


def _special(c: str) -> bool:
    """A character that changes a string's state: a quote, a backslash or a control character."""
    return c == '"' or c == "\\" or c < " "


def _after(keys: list[str], prefix: str, c: str, lo: int, hi: int) -> int:
    """The end of the keys that start with prefix + c."""
    return hi if ord(c) == 0x10FFFF else bisect_left(keys, prefix + chr(ord(c) + 1), lo, hi)


class Vocabulary:
    """What constrained JSON needs of a tokenizer, computed once. Token texts in sorted order
    are walked like a trie (a prefix's tokens lie in one range of keys). Inside a string most
    tokens change nothing, so each text's last quote, backslash or control character is kept: a
    range of tokens past those is allowed at once, and only the others are run character by
    character."""

    def __init__(self, table: TokenTable):
        self.table, self.size, self.stop_ids = table, table.size, list(table.stop_ids)
        entries: dict[str, tuple[list[int], list[int]]] = {}
        self.tail_only, self.heads = [], []
        for i, p in enumerate(table.pieces):
            if p is None or not (p.head or p.text or p.tail) or (p.tail and not _valid_start(p.tail)):
                continue
            if p.head:
                self.heads.append((i, p))
            elif not p.text:
                self.tail_only.append(i)
            else:
                entries.setdefault(p.text, ([], []))[1 if p.tail else 0].append(i)
        self.keys = sorted(entries)
        self.ids = [entries[k] for k in self.keys]  # (tokens ending whole with this text, with a tail)
        self.last_special = np.array([m.end() - 1 if (m := _UP_TO_SPECIAL.match(k)) else -1 for k in self.keys],
                                     dtype=np.int32)
        counts = [len(w) + len(t) for w, t in self.ids]
        self.tokens = np.array([i for w, t in self.ids for i in w + t], dtype=np.int64)  # by key
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.token_last_special = np.repeat(self.last_special, counts)

    def children(self, prefix: str, lo: int, hi: int, chars):
        """(character, lo, hi) for each next character after `prefix` (only those in `chars`
        unless None) among keys[lo:hi], which all start with `prefix`."""
        keys, n = self.keys, len(prefix)
        if chars is None:
            j = lo + (lo < hi and len(keys[lo]) == n)
            while j < hi:
                c = keys[j][n]
                end = _after(keys, prefix, c, j, hi)
                yield c, j, end
                j = end
        else:
            for c in chars:
                a = bisect_left(keys, prefix + c, lo, hi)
                if a < hi and keys[a].startswith(prefix + c):
                    yield c, a, _after(keys, prefix, c, a, hi)


@lru_cache(maxsize=4)
def vocabulary(tokenizer) -> Vocabulary:
    return Vocabulary(token_table(tokenizer))


class JSONConstraint:
    """The engine's constraint for JSON of one schema. States: frozensets of stacks."""

    def __init__(self, vocab: Vocabulary, node: Node, vocab_size: int):
        self.vocab, self.node, self.vocab_size = vocab, node, max(vocab_size, vocab.size)
        self.stop_ids = vocab.stop_ids
        self._steps: dict = {}
        # Masks per stack, least recently used dropped: about 32 MB of them in all.
        self._masks: OrderedDict = OrderedDict()
        self._room = max(64, 2**25 // self.vocab_size)

    def start(self) -> frozenset:
        return frozenset({(("r", self.node),)})

    def finished(self, state: frozenset) -> bool:
        return state == frozenset({()})

    def _step(self, stack, ch: str) -> frozenset:
        key = (stack, ch)
        out = self._steps.get(key)
        if out is None:
            if len(self._steps) > 200_000:
                self._steps.clear()
            out = frozenset(step(stack, ch))
            self._steps[key] = out
        return out

    def _step_all(self, stacks, ch: str) -> frozenset:
        if len(stacks) == 1:
            return self._step(next(iter(stacks)), ch)
        out = frozenset()
        for s in stacks:
            out |= self._step(s, ch)
        return out

    def _chars(self, stacks):
        out = set()
        for s in stacks:
            chars = next_chars(s)
            if chars is None:
                return None
            out |= chars
        return out

    def _run(self, stacks, text: str) -> frozenset:
        for ch in text:
            stacks = self._step_all(stacks, ch)
            if not stacks:
                break
        return stacks

    def advance(self, state: frozenset, token: int) -> frozenset:
        piece = self.vocab.table.pieces[token] if token < len(self.vocab.table.pieces) else None
        out = self._advance(state, piece)
        if not out:
            raise ValueError(f"token {token} does not continue the JSON value here")
        return out

    def _advance(self, stacks, piece) -> frozenset:
        if piece is None:
            return frozenset()
        if piece.head:
            moved = set()
            for s in stacks:
                if s and s[-1][0] == "s" and s[-1][1]:
                    sofar = s[-1][1] + piece.head
                    if len(sofar) == utf8_length(sofar[0]) and _valid_start(sofar):
                        moved.add(s[:-1] + (PLAIN_STRING,))
                    elif not (piece.text or piece.tail) and _valid_start(sofar):
                        moved.add(s[:-1] + (("s", sofar, 0),))
            stacks = frozenset(moved)
        elif any(s and s[-1][0] == "s" and s[-1][1] for s in stacks):
            stacks = frozenset(s for s in stacks if not (s and s[-1][0] == "s" and s[-1][1]))
        stacks = self._run(stacks, piece.text)
        if piece.tail:
            stacks = frozenset(s[:-1] + (("s", piece.tail, 0),) for s in stacks if s and s[-1] == PLAIN_STRING)
        return stacks

    def mask(self, state: frozenset) -> torch.Tensor:
        if len(state) == 1:
            return self._stack_mask(next(iter(state)))
        m = np.zeros(self.vocab_size, dtype=bool)
        for stack in state:
            m |= self._stack_mask(stack).numpy()
        return torch.from_numpy(m)

    def _stack_mask(self, stack: tuple) -> torch.Tensor:
        m = self._masks.get(stack)
        if m is not None:
            self._masks.move_to_end(stack)
            return m
        # numpy: torch spreads fills of this size over threads, slow when the cores are busy
        m = np.zeros(self.vocab_size, dtype=bool)
        ids: list[int] = []
        if accepts(stack):
            ids += self.stop_ids
        top = stack[-1] if stack else None
        if top is not None and top[0] == "s" and top[1]:
            # inside a character split over tokens: only tokens that finish it
            ids += [i for i, p in self.vocab.heads if self._advance(frozenset({stack}), p)]
        elif top == PLAIN_STRING:
            ids += self.vocab.tail_only
            self._plain(frozenset({stack}), 0, 0, len(self.vocab.keys), m, ids)
        else:
            self._walk(frozenset({stack}), "", 0, len(self.vocab.keys), m, ids)
        if ids:
            m[ids] = True
        if not m.any():  # a dead end (cannot happen for a valid schema): end rather than emit garbage
            m[self.stop_ids] = True
        m = self._masks[stack] = torch.from_numpy(m)
        if len(self._masks) > self._room:
            self._masks.popitem(last=False)
        return m

    def _walk(self, stacks, prefix: str, lo: int, hi: int, m: np.ndarray, out: list[int]):
        """Allow the tokens among keys[lo:hi] (all starting with `prefix`, which led to `stacks`)
        whose text continues the value: in `m`, or listed in `out`."""
        keys = self.vocab.keys
        for c, a, b in self.vocab.children(prefix, lo, hi, self._chars(stacks)):
            after = self._step_all(stacks, c)
            if not after:
                continue
            if all(s and s[-1] == PLAIN_STRING for s in after):
                self._plain(after, len(prefix) + 1, a, b, m, out)
                continue
            longer = prefix + c
            if keys[a] == longer:  # tokens whose text is exactly this
                whole, tail = self.vocab.ids[a]
                out += whole
                if tail and PLAIN_STRING in (s[-1] for s in after if s):
                    out += tail
            if b - a > 1 or keys[a] != longer:
                self._walk(after, longer, a, b, m, out)

    def _plain(self, stacks, depth: int, lo: int, hi: int, m: np.ndarray, out: list[int]):
        """The same inside a string, reached after `depth` characters: tokens with nothing
        special from there on keep it a string; the others are run from their first quote,
        backslash or control character."""
        v = self.vocab
        a, b = v.offsets[lo], v.offsets[hi]
        m[v.tokens[a:b][v.token_last_special[a:b] < depth]] = True
        for k in (lo + np.flatnonzero(v.last_special[lo:hi] >= depth)).tolist():
            text = v.keys[k]
            first = next(j for j in range(depth, len(text)) if _special(text[j]))
            after = self._run(stacks, text[first:])
            if after:
                whole, tail = v.ids[k]
                out += whole
                if tail and PLAIN_STRING in (s[-1] for s in after if s):
                    out += tail


_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()  # requests may ask from several server threads at once


def json_constraint(llm_or_tokenizer, schema: dict | None = None) -> JSONConstraint:
    """The constraint that keeps generated text JSON of `schema` (None: any JSON object).
    Takes an LLM (its model's vocabulary size sizes the masks) or a Tokenizer. Raises SchemaError
    for a schema outside the supported subset. Constraints are cached per tokenizer and schema, so
    their masks serve later requests too."""
    tokenizer = getattr(llm_or_tokenizer, "tokenizer", llm_or_tokenizer)
    model = getattr(llm_or_tokenizer, "model", None)
    vocab_size = model.config.vocab_size if model is not None else 0
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"the schema must be JSON (dicts, lists, strings, numbers): {e}") from None
    key = (id(tokenizer), text, vocab_size)
    node = compile_schema(schema)  # checked first: a bad schema fails fast, before any vocabulary work
    vocab = vocabulary(tokenizer)
    with _CACHE_LOCK:
        c = _CACHE.get(key)
        if c is None or c.vocab is not vocab:
            c = _CACHE[key] = JSONConstraint(vocab, node, vocab_size)
            if len(_CACHE) > 16:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
    return c
