"""JSON output by constrained decoding: random walks through the masks always end in JSON that
satisfies the schema, whatever the tokenizer does to characters; the tiny random model (which
alone writes repeated letters) is forced into valid JSON; a budget that ends mid-value is
reported; schemas outside the subset are refused by name; and the bundled SmolLM2 writes
valid JSON for a schema and for Ollama's format "json", batched, at temperature 1."""

import json
import random
import time

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from llmos.engine.sampling import SamplingParams
from llmos.tokenizer import Tokenizer
from llmos.writing.json_schema import SchemaError, compile_schema, json_constraint, validate

try:
    import jsonschema_rs  # a reference checker, when the test extras brought it
except ImportError:
    jsonschema_rs = None

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "address"],
}

# Every path through these ends within a bounded number of characters: no free strings, arrays
# with maxItems, numbers and whitespace bounded by the machine. The tiny model must finish them.
BOUNDED = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object",
     "properties": {
         "kind": {"enum": ["poem", "story", "essay \"quoted\"", 3, None]},
         "lines": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
         "meta": {"type": "object", "properties": {"draft": {"type": "boolean"}, "none": {"type": "null"},
                                                    "v": {"const": "1.0"}},
                  "required": ["v"]},
     },
     "required": ["kind", "lines", "meta"]},
    {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "boolean"},
                                          {"type": "object", "properties": {"a": {"type": "null"}},
                                           "required": ["a"]}]},
     "maxItems": 3},
    {"enum": [1, 12, 123]},
]

# What pydantic's model_json_schema() writes: titles, $defs and $ref, Optional as anyOf with null.
PYDANTIC = {
    "$defs": {"Pet": {"enum": ["cat", "dog"], "title": "Pet", "type": "string"},
              "Place": {"properties": {"city": {"title": "City", "type": "string"}},
                        "required": ["city"], "title": "Place", "type": "object"}},
    "properties": {"name": {"title": "Name", "type": "string"},
                   "pet": {"$ref": "#/$defs/Pet"},
                   "home": {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "null"}], "default": None}},
    "required": ["name", "pet"], "title": "Person", "type": "object",
}
TREE = {"$defs": {"Node": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2}},
    "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/Node"}

ANY_SHAPES = [
    None,
    PERSON,
    PYDANTIC,
    TREE,
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "array", "items": {"type": "array", "items": {"type": ["integer", "string"]}, "maxItems": 2},
     "minItems": 2, "maxItems": 3},
    {"type": "string"},
    {"type": "number"},
    *BOUNDED,
]


def assert_valid(text: str, schema):
    value = json.loads(text)
    assert validate(value, schema) == [], (text, validate(value, schema))
    if jsonschema_rs is not None:
        reference = {"type": "object"} if schema is None else schema
        assert jsonschema_rs.is_valid(reference, value), (text, schema)
    return value


def walk(constraint, tokenizer, rng, limit=400):
    """Draw tokens uniformly from each mask, preferring short ones and ending as soon as allowed
    half the time (so that strings close). Returns (text, ended)."""
    stops = set(tokenizer.stop_ids)
    pieces = constraint.vocab.table.pieces
    short = np.zeros(constraint.vocab_size, dtype=bool)
    short[[i for i, p in enumerate(pieces) if p is not None and len(p.text) <= 2]] = True
    state, out = constraint.start(), []
    for _ in range(limit):
        mask = constraint.mask(state).numpy()
        assert mask.any()
        if any(mask[i] for i in stops):
            if rng.random() < 0.5 or mask.sum() == len([i for i in stops if mask[i]]):
                            return tokenizer.decode(out), True
        mask = mask.copy()
        mask[list(stops)] = False
        pool = np.flatnonzero(mask & short) if rng.random() < 0.9 and (mask & short).any() else np.flatnonzero(mask)
        token = int(rng.choice(pool.tolist()))
        out.append(token)
        state = constraint.advance(state, token)
    return tokenizer.decode(out), False


def sentencepiece_tokenizer() -> Tokenizer:
    """A SentencePiece-style vocabulary: "▁" for spaces, <0xNN> byte pieces (so "é" and "雪"
    are spelt in pieces), and JSON punctuation merged into words."""
    words = ["{", "}", "[", "]", '"', ",", ":", '":', '",', '"}', '{"', "▁", "▁\"", "true", "false", "null",
             "name", "age", "pet", "cat", "dog", "none", "city", "zip", "tags", "\\", "\\n", "\\u", "00", "e9",
             "0", "1", "2", "9", "12", "-", ".", "e", "▁the", "▁sea", "poem", "story", "essay", "quoted",
             "kind", "lines", "meta", "draft", "v", "ok", "n", "a", "address", "score", "active", "\n", "▁▁"]
    tokens = words + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {"<eos>": 0, **{t: i + 1 for i, t in enumerate(dict.fromkeys(tokens))}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(["<eos>"])
    return Tokenizer(hf, eos_token="<eos>")


@pytest.mark.parametrize("schema", ANY_SHAPES, ids=lambda s: "any-object" if s is None else json.dumps(s)[:40])
def test_random_walks_end_in_valid_json(schema, tiny_llm):
    """Byte-level BPE (the tiny model's, where a character may be split over tokens) and a
    SentencePiece-style vocabulary with byte pieces: every finished walk is valid JSON."""
    for tokenizer, vocab_size in ((tiny_llm.tokenizer, tiny_llm.model.config.vocab_size),
                                  (sentencepiece_tokenizer(), 0)):
        c = json_constraint(tokenizer, schema)
        assert c.vocab_size >= max(vocab_size, c.vocab.size)
        rng = random.Random(7)
        finished = 0
        for _ in range(25):
            text, ended = walk(c, tokenizer, rng)
            if ended:
                assert_valid(text, schema)
                finished += 1
        assert finished >= 10, f"only {finished} of 25 walks finished"


def test_start_and_end_masks(tiny_llm):
    """The first token opens the value (no stop token, no leading text); once the value is
    complete only the stop tokens are allowed; a number may end or go on."""
    tok = tiny_llm.tokenizer
    c = json_constraint(tiny_llm, None)
    first = c.mask(c.start()).nonzero().flatten().tolist()
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    state = c.start()
    for t in tok.encode('{"a": [1, "x\\n\\u00e9", {"b": null}], "c": true}', add_bos=False):
        assert c.mask(state)[t], tok.decode([t])
        state = c.advance(state, t)
    assert c.finished(state)
    assert sorted(c.mask(state).nonzero().flatten().tolist()) == sorted(tok.stop_ids)

    n = json_constraint(tiny_llm, {"type": "integer"})
    state = n.start()
    for t in tok.encode("-12", add_bos=False):
        state = n.advance(state, t)
    allowed = n.mask(state)
    assert all(allowed[t] for t in tok.stop_ids) and allowed[tok.encode("3", add_bos=False)[0]]
    assert not allowed[tok.encode(".", add_bos=False)[0]]  # an integer has no point


def test_whitespace_is_bounded(tiny_llm):
    """Spaces between tokens run out: the model cannot loop on them."""
    tok = tiny_llm.tokenizer
    c = json_constraint(tiny_llm, None)
    space = tok.encode(" ", add_bos=False)[0]
    state = c.advance(c.start(), tok.encode("{", add_bos=False)[0])
    count = 0
    while c.mask(state)[space]:
        state = c.advance(state, space)
        count += 1
    assert 0 < count <= 10


@pytest.mark.parametrize("schema", BOUNDED, ids=lambda s: json.dumps(s)[:40])
def test_tiny_model_is_kept_to_the_schema(schema, tiny_llm):
    """The tiny random model, batched (n=3) at temperature 1 over two seeds, ends every
    candidate with valid JSON of the schema."""
    c = json_constraint(tiny_llm, schema)
    for seed in (0, 1):
        params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed, constraint=c)
        result = tiny_llm.generate("Write JSON:", params, n=3)
        assert len(result.completions) == 3
        for completion in result.completions:
            assert completion.finish_reason == "stop", completion.text
            assert_valid(completion.text, schema)


def test_budget_ending_mid_value_is_reported(tiny_llm):
    """Ten numbers need more than twelve tokens: the budget ends the text mid-value, with finish
    reason "length" and JSON that does not parse (as with Ollama)."""
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 10}
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=0, constraint=json_constraint(tiny_llm, schema))
    (completion,) = tiny_llm.generate("Write JSON:", params).completions
    assert completion.finish_reason == "length" and len(completion.token_ids) == 12
    assert completion.text.startswith("[")
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "string", "pattern": "^a+$"}, "pattern"),
    ({"type": "string", "minLength": 2}, "minLength"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "string", "format": "date-time"}, "format"),
    ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf"),
    ({"$ref": "https://example.com/person.json"}, "inside the schema"),
    ({"$ref": "#/$defs/Person"}, "points to nothing"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"type": "string"}}, "type": "string"}, "'type'"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}}, "maxLength"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}, "minProperties"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": [{"type": "integer"}]}, "items"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"),
    ({"type": "date"}, "'date'"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems"),
    ({"anyOf": [], "type": "string"}, "anyOf"),
    ({"enum": []}, "enum"),
    ("string", "dict"),
])
def test_unsupported_schemas_are_refused_by_name(schema, keyword, tiny_llm):
    with pytest.raises(SchemaError, match=keyword.replace("$", r"\$")):
        json_constraint(tiny_llm, schema)


def test_annotations_are_ignored_and_types_compile():
    schema = {"title": "Person", "description": "someone", "type": "object", "$schema": "x",
              "properties": {"n": {"type": "integer", "title": "N", "default": 1, "examples": [2]}}}
    assert compile_schema(schema).kind == "object"
    assert compile_schema({}).kind == "any" and compile_schema(None).kind == "object"
    assert compile_schema({"type": ["string", "null"]}).kind == "union"
    tree = compile_schema(TREE)
    assert tree.props[1][1].items is tree  # a schema that refers to itself loops


def test_validate_lists_what_is_broken():
    assert validate({"name": "Ann", "age": 3, "pet": "cat", "address": {"city": "Oslo"}}, PERSON) == []
    problems = validate({"name": 1, "age": 2.5, "pet": "cow", "address": {"zip": None, "x": 1}, "tags": list("abcd")},
                        PERSON)
    text = "\n".join(problems)
    for expected in ("$.name: 1 is not of type 'string'", "$.age: 2.5", "'cow' is not one of",
                     "required property 'city'", "property 'x' is not allowed", "more than maxItems 3"):
        assert expected in text, (expected, text)
    assert validate(True, {"enum": [1]}) != [] and validate(1.0, {"enum": [1]}) == []
    assert validate([1], None) == ["$: [1] is not of type 'object'"]
    assert validate({"v": 1, "kids": [{"v": "x"}]}, TREE) == ["$.kids[0].v: 'x' is not of type 'integer'"]


# --- the bundled SmolLM2: a real vocabulary and a model that writes words ------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from llmos.llm import LLM

    return LLM.load(smollm2_dir)


@pytest.mark.bundled
def test_step_cost_on_smollm2_vocabulary(smollm2):
    """Masks over SmolLM2's 49,152 tokens, computed cold for states of every kind (printed, not
    asserted: timings depend on the machine)."""
    c = json_constraint(smollm2, None)
    c._masks.clear()
    c._steps.clear()
    tok, state, costs = smollm2.tokenizer, c.start(), []
    text = '{"title": "The sea \\"at\\" night", "lines": [1, 2.5e3, -0.25], "nested": {"ok": true, "none": null}}'
    for t in tok.encode(text, add_bos=False):
        began = time.perf_counter()
        allowed = c.mask(state)
        costs.append(time.perf_counter() - began)
        assert allowed[t], tok.decode([t])
        state = c.advance(state, t)
    assert c.finished(state)
    costs.sort()
    print(f"\nJSON mask on {c.vocab_size} tokens, cold: median {1000 * costs[len(costs) // 2]:.2f} ms, "
          f"max {1000 * costs[-1]:.2f} ms over {len(costs)} steps")
    began = time.perf_counter()
    for _ in range(100):
        c.mask(state)
    print(f"cached: {10 * (time.perf_counter() - began) * 1000:.1f} µs a step")


@pytest.mark.bundled
@pytest.mark.slow
@pytest.mark.parametrize("schema, seeds", [(PERSON, (0, 1)), (None, (0,))], ids=["person", "any-object"])
def test_smollm2_writes_valid_json(schema, seeds, smollm2):
    """Three candidates a request at temperature 1: every one parses and satisfies the schema."""
    prompt = [{"role": "user", "content": "Describe a person who lives by the sea, as JSON with their name, "
                                          "age, pet and address."}]
    c = json_constraint(smollm2, schema)
    for seed in seeds:
        params = SamplingParams(max_tokens=320, temperature=1.0, seed=seed, constraint=c)
        result = smollm2.generate(prompt, params, n=3)
        for completion in result.completions:
            assert completion.finish_reason == "stop", completion.text
            value = assert_valid(completion.text, schema)
            assert isinstance(value, dict)
