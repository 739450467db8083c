"""Request and response shapes: the OpenAI API's (field for field, in its documentation's
order) and LLMOS's own routes. Each generation request converts itself to SamplingParams; the
response models document `/openapi.json`."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmos.engine.sampling import SamplingParams


# A stored row's id in a URL (a SQLite integer): beyond 64 bits, a 400 rather than an overflow.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# A seed is a 64-bit integer (what torch's generators take); beyond it, a 400 rather than an overflow.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields real front ends send to an OpenAI-compatible server that LLMOS does not implement:
# accepted and ignored, so that they work unchanged (SillyTavern 1.19's text-completion body,
# createTextGenGenerationData in public/scripts/textgen-settings.js, and its chat-completion
# body; OpenAI's own chat fields for tools and reasoning). Any other unknown field is a 400.
IGNORED_FIELDS = frozenset("""
    max_new_tokens typical sampler_seed skew min_length minimum_message_content_tokens min_tokens num_beams
    early_stopping add_bos_token dynamic_temperature dynatemp_low dynatemp_high dynatemp_range
    dynatemp_exponent dynatemp_min dynatemp_max dynatemp_mode smoothing_factor smoothing_curve
    dry_sequence_breakers dry_penalty_last_n max_tokens_second sampler_priority samplers_priorities
    stopping_strings truncation_length ban_eos_token skip_special_tokens include_reasoning epsilon_cutoff
    eta_cutoff mirostat_mode mirostat_tau mirostat_eta mirostat custom_token_bans api_type api_server
    legacy_api nsigma top_n_sigma min_keep adaptive_target adaptive_decay rep_pen rep_pen_range
    rep_pen_size rep_pen_slope repetition_decay repetition_penalty_range encoder_repetition_penalty
    penalty_alpha temperature_last speculative_ngram do_sample guidance_scale negative_prompt
    grammar_string grammar grammar_retain_state json_schema repeat_penalty repeat_last_n n_predict
    num_predict num_ctx n_probs trim_stop cache_prompt spaces_between_special_tokens guided_grammar
    guided_json include_stop_str_in_output tfs_z bypass_status_check streaming best_of
    tools tool_choice parallel_tool_calls functions function_call reasoning_effort
    metadata store modalities audio prediction service_tier web_search_options
""".split())
# llama.cpp's `samplers` names that have no sampler here: dropped from an order, not refused
SAMPLERS_NOT_HERE = frozenset({"top_n_sigma", "nsigma", "infill", "mirostat", "adaptive_p"})


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float | bool] | list[list[str | int | float | bool]] | None = Field(
        None, max_length=300, description="Token id (or text: each of its tokens) -> bias in [-100, 100]; false bans. "
                                          "Also llama.cpp's list of [token or text, bias] pairs.")
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # LLMOS extensions
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, lt=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64)
    ban: list[str] | None = Field(None, max_length=256,
                                  description="Words or phrases never to produce (as `llmos generate --ban`).")
    ignore_eos: bool = False  # run to max_tokens past end-of-text (fixed-length load tests)
    top_a: float | None = Field(None, ge=0, le=1)
    tfs: float | None = Field(None, gt=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, ge=1)
    dry_allowed_length: int | None = Field(None, ge=1)
    samplers: list[str] | None = Field(None, max_length=32, description="Sampler order by name (llama.cpp's "
                                       "`samplers`): rep_pen, temperature, top_k, top_p, min_p, typical, top_a, tfs, xtc.")
    sampler_order: list[int] | None = Field(None, max_length=32, description="KoboldCpp's sampler order by number.")
    banned_strings: list[str] | None = Field(None, max_length=1024, description="Text never to produce, in any "
                                             "case and tokenisation: generation rewinds and samples again.")
    banned_regex: bool = Field(False, description="banned_strings are regular expressions.")
    slop: Literal["en", "zh"] | None = Field(None, description="Also ban the shipped slop list of this language.")
    response_format: dict | None = Field(None, description='{"type": "text"}, {"type": "json_object"} (any JSON '
                                         'object) or {"type": "json_schema", "json_schema": {"schema": {...}}}: the '
                                         'output kept to it by constrained decoding.')

    @model_validator(mode="before")
    @classmethod
    def _front_end_fields(cls, data):
        """Fields front ends send under other names are read as LLMOS's; the ones LLMOS does not
        implement are dropped (see IGNORED_FIELDS)."""
        if not isinstance(data, dict):
            return data
        aliases = {"rep_pen": "repetition_penalty", "repeat_penalty": "repetition_penalty", "typical": "typical_p",
                   "sampler_seed": "seed", "tfs_z": "tfs"}
        out = {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
        for alias, name in aliases.items():
            if data.get(alias) is not None and data.get(name) is None:
                out[name] = data[alias]
        if data.get("ban_eos_token") and "ignore_eos" not in data:
            out["ignore_eos"] = True
        if out.get("logit_bias") == []:  # SillyTavern's "no bias"
            out["logit_bias"] = None
        return out

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if isinstance(v, list):
            if any(len(pair) != 2 for pair in v):
                raise ValueError("logit_bias as a list holds [token id or text, bias] pairs")
            v = {str(key): value for key, value in v}
        for key, value in (v or {}).items():
            if not key:
                raise ValueError("logit_bias keys must be token ids or non-empty text")
            if not isinstance(value, bool) and not -100 <= value <= 100:
                raise ValueError("logit_bias values must be between -100 and 100 (or false to ban)")
        return v

    @field_validator("banned_strings")
    @classmethod
    def _banned(cls, v):
        return [s for s in v if s] if v else v

    @model_validator(mode="after")
    def _banned_regex(self):
        if self.banned_regex and self.banned_strings:
            from llmos.llm import banned_pattern

            banned_pattern(self.banned_strings, True)  # a bad expression: ValueError, a 400 naming it
        return self

    def banned(self) -> list[str] | None:
        """banned_strings with the slop list, if asked for (regex mode applies to banned_strings only)."""
        if not self.slop:
            return self.banned_strings or None
        from llmos.writing.slop import load_slop

        if self.banned_regex:
            import regex

            return list(self.banned_strings or []) + [regex.escape(p) for p in load_slop(self.slop)]
        return list(self.banned_strings or []) + list(load_slop(self.slop))

    def order(self) -> list[str] | None:
        """The sampler order, from `samplers` (names) or KoboldCpp's `sampler_order` (numbers)."""
        if self.samplers:
            return [n for n in self.samplers if n.lower() not in SAMPLERS_NOT_HERE] or None
        if self.sampler_order:
            bad = next((n for n in self.sampler_order if not 0 <= n < len(KOBOLD_SAMPLERS)), None)
            if bad is not None:
                raise ValueError(f"sampler_order: {bad} is not a KoboldCpp sampler number; use 0-6 "
                                 f"({', '.join(f'{k} {v}' for k, v in enumerate(KOBOLD_SAMPLERS))})")
            return [KOBOLD_SAMPLERS[n] for n in self.sampler_order]
        return None

    def token_bias(self, tokenizer, vocab_size: int) -> dict[int, float]:
        """logit_bias by token id; a text key biases each of its tokens; false bans (-100)."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            value = -100.0 if value is False else 0.0 if value is True else float(value)
            if key.lstrip("-").isdigit():
                ids = [int(key)]
                if not 0 <= ids[0] < vocab_size:
                    raise ValueError(f"logit_bias: token id {ids[0]} is outside the vocabulary (size {vocab_size})")
            else:
                ids = tokenizer.encode(key, add_bos=False)
            for i in ids:
                bias[i] = value
        return bias

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, llm, logprobs: int | None, vocab_size: int) -> SamplingParams:
        bias = self.token_bias(llm.tokenizer, vocab_size)
        from llmos.writing.tasks import banned_sequences

        return llm.sampling(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, typical_p=self.typical_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, seed=self.seed, logprobs=logprobs,
            logit_bias=bias or None, banned_sequences=banned_sequences(llm.tokenizer, self.ban) if self.ban else None,
            top_a=self.top_a, tfs=self.tfs, xtc_threshold=self.xtc_threshold, xtc_probability=self.xtc_probability,
            dry_multiplier=self.dry_multiplier, dry_base=self.dry_base, dry_allowed_length=self.dry_allowed_length,
            sampler_order=self.order(), constraint=self.json_output(llm),
        )

    def json_output(self, llm):
        """The JSON constraint response_format asks for (None for text)."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        from llmos.writing.json_schema import SchemaError, json_constraint

        if kind == "json_object":
            return json_constraint(llm, None)
        if kind != "json_schema":
            raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
        spec = self.response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError('response_format of type json_schema needs {"json_schema": {"schema": {...}}}')
        try:
            return json_constraint(llm, spec["schema"])
        except SchemaError as e:
            raise ValueError(f"response_format: {e}") from None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    # LLMOS extensions
    beams: int = Field(0, ge=0, le=16, description="Beam search with this many beams (deterministic; 0 = sampling).")
    length_penalty: float = Field(1.0, description="Beam search: rank by score / length**length_penalty.")


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read (images and audio are not)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = ""
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # the "content parts" form: keep the text parts
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class ModerationRequest(BaseModel):
    """POST /v1/moderations: texts checked against the server's safety policy, in OpenAI's shape."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str | ContentPart] = Field(description="A text, a list of texts, or content parts "
                                                             "(only text parts are read).")
    model: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        return [p if isinstance(p, str) else (p.text or "") for p in self.input
                if isinstance(p, str) or p.type == "text"]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


class WriteRequestBody(BaseModel):
    """POST /api/write: a writing task (see `llmos tasks`), with every option of `llmos write`."""

    model_config = ConfigDict(extra="forbid")

    task: str
    brief: str
    model: str | None = None
    lang: Literal["en", "zh"] | None = None
    form: str | None = None
    variables: dict[str, str] = {}
    n: int = Field(1, ge=1, le=16)
    rank: bool | str = Field(False, description="Order candidates by likelihood, form, repetition and distinctness; "
                                                 "'style:MODEL' adds closeness to the style MODEL learned "
                                                 "(--objective multitask).")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    dry: float | None = Field(None, ge=0, description="DRY repetition penalty strength (0.8 is typical; 0 = off).")
    allow_phrases: bool = Field(False, description="Do not ban stock phrases such as 'a testament to'.")
    banned_phrases: list[str] | None = Field(None, description="Phrases to ban instead of the built-in list.")
    banned_strings: list[str] | None = Field(None, max_length=1024, description="Text never written, in any case "
                                             "and tokenisation: a candidate that completes one rewinds and samples "
                                             "again (unlike banned_phrases' token masks).")
    banned_regex: bool = Field(False, description="banned_strings are regular expressions.")
    seed: Seed | None = None
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    chapters: int = Field(5, ge=1, le=50, description="novel: number of chapters.")
    book: str | None = Field(None, description="novel: the book's name; its stages are kept under $LLMOS_HOME/books/NAME.")
    check_copying: bool = Field(False, description="Check each candidate for verbatim copying (50+ characters) from "
                                                   "the model's training data, or from the texts the server was "
                                                   "started with (llmos serve --copy-index).")

    @field_validator("rank")
    @classmethod
    def _rank(cls, value):
        from llmos.writing.rank import style_model

        style_model(value)  # a ValueError here is a 422 naming the field
        return value


class ExplainBody(BaseModel):
    """POST /api/explain: which prompt parts each completion token leaned on (gradient x input)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str = Field(min_length=1, description="The prompt exactly as it was sent (a story's context: the "
                                                  "`prompt` of /api/story/continue's first event).")
    completion: str | list[int] = Field(description="The generated text, or its token ids (exact).")
    indices: list[int] | None = Field(None, max_length=256, description="Explain only these completion tokens "
                                                                        "(0-based); the others are still context.")
    unit: Literal["token", "word", "line"] = "word"
    top: int = Field(5, ge=1, le=50, description="Prompt parts listed per token, heaviest first.")


class CheckPoemBody(BaseModel):
    """POST /api/check-poem: a user's own poem, checked against a form (llmos check-poem)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., max_length=20_000)
    form: str | None = Field(None, description="A form from GET /api/tasks; default: told from the poem's shape.")
    tones: Literal["strict", "loose", "off"] | None = Field(None, description="Chinese forms: how strictly 平仄 is kept.")
    book: Literal["pingshui", "xinyun"] | None = Field(None, description="Chinese forms: 平水韵 (default) or 中华新韵.")
    variables: dict[str, str] = {}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StoryContinueBody(BaseModel):
    """POST /api/story/continue: continue a story with Memory, Author's Note and Lorebook."""

    model_config = ConfigDict(extra="ignore")

    text: str
    memory: str = ""
    authors_note: str = ""
    authors_note_depth: int = Field(3, ge=0)
    lorebook: list[dict] = Field([], description="Entries with the lorebook engine's fields (docs/writing.md): "
                                                 "keys, content, secondary_keys, logic, position, depth, ...")
    lore_budget: int = Field(300, ge=0)
    max_tokens: int = Field(80, ge=1, le=2048)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    xtc_threshold: float | None = Field(None, ge=0, le=0.5)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    banned_strings: list[str] | None = Field(None, description="Text never written, in any case: a candidate that "
                                                              "completes one is rewound and samples again.")
    seed: Seed | None = None
    logprobs: int | None = Field(5, ge=0, le=20)


# -- responses --------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobItem(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobItem] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]] | None = None
    # LLMOS extension: what fired, and the action the policy takes on it
    action: str | None = None
    findings: list[dict[str, Any]] | None = None


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class WriteCandidate(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    form_problems: list[str] | None = None
    logprobs: list[TokenLogprobItem] | None = None
    safety: dict[str, Any] | None = Field(None, description="What the safety policy found in it (when it found anything).")
    copying: dict[str, Any] | None = Field(None, description="With check_copying: its verbatim overlap with the training data.")


class WriteResponse(BaseModel):
    task: str
    model: str
    prompt: str | list[dict[str, str]] | None = Field(None, description="What the candidates were written from, as "
                                                                        "the model was sent it (a text, or chat "
                                                                        "messages); POST /api/preferences takes it back.")
    candidates: list[WriteCandidate]
    usage: Usage
    form: dict[str, Any] | None = Field(None, description="The form kept and each candidate's problems (none: kept).")
    ranking: list[dict[str, Any]] | None = Field(None, description="With rank: candidates best first, with their scores.")
    revision: dict[str, Any] | None = Field(None, description="rewrite: the revised text, suggestions and a word diff.")
    ideas: list[str] | None = Field(None, description="brainstorm: the distinct ideas.")


class ExplainSource(BaseModel):
    start: int
    end: int
    text: str
    weight: float


class ExplainToken(BaseModel):
    index: int
    token: str
    token_id: int
    probability: float
    sources: list[ExplainSource]
    prompt_share: float


class ExplainResponse(BaseModel):
    model: str
    method: str
    attributions: list[ExplainToken]


class NovelStage(BaseModel):
    name: str
    path: str
    generated: bool
    text: str


class NovelResponse(BaseModel):
    book: str
    folder: str
    stages: list[NovelStage]


class TaskInfo(BaseModel):
    description: str
    variables: dict[str, Any]
    languages: list[str]


class FormInfo(BaseModel):
    kind: str
    description: str


class PoemProblem(BaseModel):
    line: int | None = Field(None, description="1-based; null for the poem as a whole.")
    rule: str
    message: str


class CheckPoemResponse(BaseModel):
    form: str
    ok: bool
    problems: list[PoemProblem]


class TasksResponse(BaseModel):
    tasks: dict[str, TaskInfo]
    forms: dict[str, FormInfo]


class Health(BaseModel):
    status: str
    model: str
    running: int
    queued: int


class StoredModel(BaseModel):
    name: str
    architecture: str | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    license: str | None = None
    description: str | None = None
    installed: bool
    path: str | None = None
    served: bool = False


class StoredModels(BaseModel):
    models: list[StoredModel]


class Project(BaseModel):
    id: int
    name: str
    created_at: float
    updated_at: float
    data: dict[str, Any] | None = None


class ProjectBody(BaseModel):
    """A studio project: its name and whatever the studio keeps (text, branches, Memory...)."""

    name: str = "Untitled"
    data: dict[str, Any] = {}


class Projects(BaseModel):
    projects: list[Project]


class Deleted(BaseModel):
    deleted: int | str


# -- chat over HTTP ---------------------------------------------------------------------------


class PersonaInfo(BaseModel):
    name: str
    description: str = ""
    greeting: str = ""
    system: str = ""
    language: str | None = None
    builtin: bool = False


class Personas(BaseModel):
    personas: list[PersonaInfo]


class SessionCreate(BaseModel):
    """POST /api/chat/sessions: start a chat (the persona's greeting is its first turn)."""

    model_config = ConfigDict(extra="forbid")

    persona: str | None = Field(None, description="A persona name (GET /api/personas); default: assistant.")
    kb: str | None = Field(None, description="Answer from this knowledge base.")
    model: str | None = Field(None, description="Default: by the persona's language (Chinese: the multilingual model).")
    title: str = ""


class SessionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = None
    persona: str | None = Field(None, description="Talk to another persona from here on.")
    kb: str | None = None


class TurnOptions(BaseModel):
    """How a reply is generated (as `llmos chat`'s options)."""

    model_config = ConfigDict(extra="forbid")

    stream: bool = False
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    budget: int | None = Field(None, ge=64, description="Prompt tokens allowed; older turns are summarised beyond it.")
    extract_facts: bool = Field(True, description="Pin facts found in the user's messages.")


class TurnRequest(TurnOptions):
    content: str = Field(min_length=1)


class Rating(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: int | Literal["up", "down"] = Field(description="1-5, or up (5) / down (1).")


class FactBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fact: str = Field(min_length=1)


class Turn(BaseModel):
    id: int
    role: str
    content: str
    active: int
    rating: int | None = None
    meta: dict[str, Any] = {}
    created_at: float


class Session(BaseModel):
    id: int
    title: str
    persona: str
    model: str
    kb: str | None = None
    status: str
    handover: int
    created_at: float
    updated_at: float
    user_turns: int | None = None
    first_message: str | None = None


class SessionDetail(Session):
    persona_data: dict[str, Any] = {}
    summary: str = ""
    facts: list[str] = []
    turns: list[Turn] = []


class Sessions(BaseModel):
    sessions: list[Session]


class TurnResponse(BaseModel):
    session: int
    reply: str
    turn: Turn | None = None
    strategy: str | None = Field(None, description="farewell, handover, topic or faq when a strategy answered.")
    handover: bool = False
    closed: bool = False


class Undone(BaseModel):
    session: int
    taken: str


class Pinned(BaseModel):
    session: int
    pinned: bool
    facts: list[str]


# -- chat swipes: a message's alternative replies ------------------------------------------------


class Alternatives(BaseModel):
    """GET /api/chat/sessions/{id}/alternatives: every reply one message got, oldest first."""

    session: int
    reply_to: int | None = Field(description="The user turn they answer; null: the persona's greetings (before the first message).")
    index: int | None = Field(description="Which alternative is the active reply.")
    latest: bool = Field(description="The latest exchange: only its alternatives can be swiped.")
    alternatives: list[Turn]


class SwipeRequest(TurnOptions):
    """POST /api/chat/sessions/{id}/swipe: make another alternative the active reply to the last
    message, by index (one past the last writes a new one, as retry) or by turn id."""

    index: int | None = Field(None, description="0-based, as GET .../alternatives lists them.")
    turn: int | None = Field(None, description="The id of the reply to make active.")


class KBInfo(BaseModel):
    name: str
    embedder: str
    created_at: float
    documents: int
    passages: int
    faq: int


class KBList(BaseModel):
    knowledge_bases: list[KBInfo]


class KBDocument(BaseModel):
    path: str
    sha256: str
    added_at: float
    passages: int


class KBDocuments(BaseModel):
    name: str
    documents: list[KBDocument]


class UploadedDocument(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="A file name, e.g. faq.md.")
    text: str


class KBUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[UploadedDocument] = Field(min_length=1)


class KBAddReport(BaseModel):
    name: str
    added: list[str]
    updated: list[str]
    unchanged: list[str]
    skipped: list[list[str]]
    passages: int
    seconds: float


class KBHit(BaseModel):
    score: float
    source: str
    heading: str
    text: str
    question: str | None = None
    answer: str | None = None
    passage_id: int


class KBSearch(BaseModel):
    name: str
    query: str
    hits: list[KBHit]


# -- preference pairs -------------------------------------------------------------------------


class PreferenceChoice(BaseModel):
    """POST /api/preferences: one choice among candidates written for the same prompt (a kept
    candidate, or ratings), stored as preference pairs the way data/prefs.py's `choice_pairs` makes them."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[dict[str, Any]] = Field(description="What the candidates were written from, exactly as the "
                                                           "model was sent it: a text it continued (a story), or chat "
                                                           "messages [{role, content}] (/api/write's `prompt`).")
    candidates: list[str] = Field(max_length=16, description="2 to 16 answers to the prompt, none empty.")
    kept: int | None = Field(None, description="The candidate the writer kept (0-based), over each of the others.")
    ratings: list[int | None] | None = Field(None, max_length=16, description="One per candidate: -1/1 (thumbs) or "
                                                                              "1-5, null for unrated.")
    source: Literal["studio-pick", "studio-thumbs", "studio-branch"]
    model: str | None = Field(None, description="The model that wrote the candidates.")
    meta: dict[str, Any] | None = Field(None, description="Kept with each pair (e.g. the task or the project).")


class PreferencesAdded(BaseModel):
    added: int = Field(description="Pairs stored now (a pair already stored is not stored again).")
    pairs: int = Field(description="Pairs this choice gives in all.")


class PreferencePair(BaseModel):
    id: int
    prompt: str | list[dict[str, Any]]
    chosen: str
    rejected: str
    source: str
    model: str
    meta: dict[str, Any]
    created_at: float


class PreferencePairs(BaseModel):
    pairs: list[PreferencePair]


class PreferenceSource(BaseModel):
    source: str
    pairs: int
    prompts: int
    chosen_chars: float
    rejected_chars: float
    first: float
    last: float


class PreferenceStats(BaseModel):
    sources: list[PreferenceSource]


# -- shaping engine results --------------------------------------------------------------------


def usage(req) -> dict:
    """Token counts of a finished engine request."""
    generated = sum(len(s.output) for s in req.sequences)
    return {"prompt_tokens": len(req.prompt), "completion_tokens": generated, "total_tokens": len(req.prompt) + generated}


def finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length", "cancelled": "stop", None: "stop"}.get(reason, reason)


def completion_logprobs(tokenizer, lps) -> dict:
    lps = [lp for lp in lps if lp is not None]
    return {"tokens": [tokenizer.token_text(lp.token) for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{tokenizer.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": []}


def chat_logprobs(tokenizer, lps) -> list[dict]:
    def item(token, logprob):
        text = tokenizer.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**item(lp.token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
            for lp in lps if lp is not None]


# -- corpus, training and export jobs ----------------------------------------------------------


class PrepareBody(BaseModel):
    """POST /api/prepare: `llmos prepare` as a job."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="Files, folders and globs of .txt, .md and .jsonl on this machine.")
    output: str = Field(min_length=1, description="Dataset folder to write.")
    tokenizer: str = "char"
    vocab_size: int = Field(8192, ge=2)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    separator: str | None = None
    dedup: bool = True
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    lowercase: bool = False
    remove_stopwords: bool = False
    seed: int = 1337


class TrainBody(BaseModel):
    """POST /api/train: `llmos train` as a job. `options` holds what a --config YAML file holds
    (any training option, and `model:` fields), merged by the same builder as the command's."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1, description="A folder written by `llmos prepare` (or POST /api/prepare).")
    output: str = Field(min_length=1, description="The run folder: checkpoints, metrics.jsonl, loss.png.")
    options: dict[str, Any] = Field({}, description='Training options, e.g. {"preset": "tiny", "time_limit": "5m", '
                                                    '"model": {"n_layer": 6}}.')
    set: list[str] = Field([], description="Model fields as FIELD=VALUE, as `--set`.")
    resume: bool = Field(False, description="Continue the run in output where it stopped.")


class NgramBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1)
    order: int = Field(5, ge=1, le=10)


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A run folder, checkpoint folder or model name.")
    output: str = Field(min_length=1)
    format: Literal["hf"] = "hf"


class JobInfo(BaseModel):
    id: int
    kind: str
    command: list[str]
    status: Literal["running", "done", "failed", "stopped"]
    returncode: int | None = None
    folder: str | None = None
    started_at: float
    ended_at: float | None = None
    log: str | None = Field(None, description="The end of the job's output.")
    progress: dict[str, Any] | None = Field(None, description="train: the latest metrics line.")


class JobList(BaseModel):
    jobs: list[JobInfo]


# -- the native APIs of other servers (KoboldCpp, Ollama, llama.cpp); their error shapes: errors.native_errors --


# KoboldCpp's sampler_order numbers, 0..6 (its expose.h), as the engine's sampler names.
KOBOLD_SAMPLERS = ("top_k", "top_a", "top_p", "tfs", "typical", "temperature", "rep_pen")


def native_sampling(llm, values: dict, names: dict[str, str]) -> SamplingParams:
    """The SamplingParams of a native API's request. values: LLMOS's field names (None: the
    model's default); names: the API's own name of each, which error messages use."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values.get("xtc_probability"):
        values.pop("xtc_threshold", None)  # the threshold means nothing while XTC is off
    try:
        return llm.sampling(**values)
    except ValueError as e:
        message = str(e)
        first, _, rest = message.partition(" ")
        raise ValueError(f"{names.get(first, first)} {rest}" if rest else message) from None


def fit_prompt(req, limit: int, keep: int = 0):
    """Cut an engine request's prompt to leave room for its max_tokens in a context of `limit`
    tokens, as KoboldCpp, Ollama and llama.cpp do: the first `keep` tokens stay, then the most
    recent ones (at least half the context is kept for the prompt)."""
    room = max(limit - req.params.max_tokens, limit // 2, 1)
    ids = req.prompt
    if len(ids) <= room:
        return
    keep = min(max(keep, 0), room - 1)
    req.prompt = ids[:keep] + ids[len(ids) - (room - keep):]
    if hasattr(req.hook, "truncated"):
        req.hook.truncated += len(ids) - len(req.prompt)
