"""The OpenAI wire format for `ggro serve`: request validation and response/chunk building.

Pure Python (no Ray, no torch): the Serve ingress calls these, tests can call them directly.
Errors are raised as ApiError and rendered in OpenAI's shape:
    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from ggro.config import METHODS, ConfigError, GGROConfig, knob_type, knobs
from ggro.retokenize import vocab_refusal
from ggro.rows import InputRow, parse_row, text_content
from ggro.schema import result_stats

# Knobs a request may set in its `ggro` object, with the JSON types each takes: the GGROConfig fields marked
# `request` (ggro.config `knob`) and the row's prefill; everything else stays the server's setting.
GGRO_KNOBS = {**{f.name: (int, float) if knob_type(f) is float else knob_type(f)
                 for f in knobs(GGROConfig) if f.metadata["request"]}, "prefill": str}
# OpenAI fields ggro does not implement, with the value that means "not used": any other value is a 400, never a
# silent ignore. Fields that do not change an answer (user, metadata, store, ...) are accepted.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
               "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "best_of": (None, 1), "response_format": (None, {"type": "text"}),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}
MAX_CHOICES = 8
MAX_BODY_BYTES = 4 * 1024 * 1024   # a request body above this is a 413 before it is parsed or tokenized
MAX_REFINEMENTS = 32     # S: lookahead decodes S rows per prompt, best-of-n n (ggro.n) alike
MAX_STOPS = 4


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def request_too_large(size: int, more: bool = False) -> ApiError:
    """`more`: the body was cut off once `size` bytes had arrived (a chunked body declares no length)."""
    return ApiError(413, f"request body of {'more than ' if more else ''}{size} bytes is over this server's limit "
                    f"of {MAX_BODY_BYTES} bytes", code="request_too_large")


def _type_error(param: str, want: str, got) -> ApiError:
    # 400 like OpenAI, vLLM and SGLang (FastAPI's default would be 422)
    return ApiError(400, f"`{param}` must be {want}, got {type(got).__name__}", param=param, code="invalid_type")


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if lo is not None and v < lo:
        raise ApiError(400, f"`{name}` must be >= {lo}, got {v}", param=name, code="invalid_value")
    if hi is not None and v > hi:
        raise ApiError(400, f"`{name}` must be <= {hi}, got {v}", param=name, code="invalid_value")
    return v


def _num(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise _type_error(name, "a number", v)
    if not lo <= v <= hi:
        raise ApiError(400, f"`{name}` must be in [{lo}, {hi}], got {v}", param=name, code="invalid_value")
    return float(v)


@dataclass
class ApiRequest:
    """One validated request: what to align, how, and how to answer."""
    kind: str                    # "chat" | "completion"
    row: InputRow
    cfg: GGROConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    seeded: bool = False         # the client gave `seed`: sampled methods must be reproducible
    model: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    if not raw or not raw.strip():
        raise ApiError(400, "request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    # ValueError: an integer over Python's 4300 digits; RecursionError: arrays or objects nested thousands deep
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _model(body: dict, model_names: tuple[str, ...]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model and model not in model_names:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {', '.join(model_names)}",
                       param="model", code="model_not_found")
    return model


def _check_unsupported(body: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise ApiError(400, f"`{name}` is not supported by ggro (got {body[name]!r}); leave it out",
                           param=name, code="unsupported_parameter")


def _ggro_knobs(body: dict) -> dict:
    """The request's `ggro` object, every field known and of its type."""
    ggro = body.get("ggro") or {}
    if not isinstance(ggro, dict):
        raise _type_error("ggro", "an object", ggro)
    unknown = sorted(set(ggro) - set(GGRO_KNOBS))
    if unknown:
        raise ApiError(400, f"unknown `ggro` fields: {', '.join(unknown)} (known: {', '.join(sorted(GGRO_KNOBS))})",
                       param="ggro", code="invalid_value")
    for k, v in ggro.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, GGRO_KNOBS[k])):
            want = {str: "a string", int: "an integer"}.get(GGRO_KNOBS[k], "a number")
            raise _type_error(f"ggro.{k}", want, v)
    for k in ("num_refinements", "n"):
        if isinstance(ggro.get(k), int) and ggro[k] > MAX_REFINEMENTS:
            raise ApiError(400, f"`ggro.{k}` must be <= {MAX_REFINEMENTS}, got {ggro[k]}", param=f"ggro.{k}",
                           code="invalid_value")
    return ggro


def _text_message(i: int, m):
    """messages[i] with list content (text parts only) joined into one string."""
    if isinstance(m, dict) and isinstance(m.get("content"), list):
        text = text_content(m["content"])     # the batch input's rule too (ggro.rows)
        if text is None:
            raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                           param=f"messages[{i}].content", code="invalid_value")
        return {**m, "content": text}
    if isinstance(m, dict) and m.get("content") is not None and not isinstance(m["content"], str):
        raise _type_error(f"messages[{i}].content", "a string", m["content"])
    return m


def _chat_row(body: dict, prefill) -> InputRow:
    if "messages" not in body:
        raise ApiError(400, "`messages` is required: a non-empty list of {role, content}", param="messages",
                       code="missing_field")
    msgs = body["messages"]
    if not isinstance(msgs, list):
        raise _type_error("messages", "a list of {role, content}", msgs)
    msgs[:] = [_text_message(i, m) for i, m in enumerate(msgs)]
    return parse_row({"id": "request", "messages": msgs, "prefill": prefill}, "request")


def _completion_row(body: dict, prefill) -> InputRow:
    if "prompt" not in body:
        raise ApiError(400, "`prompt` is required (a string)", param="prompt", code="missing_field")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "only one prompt string per request is supported", param="prompt",
                       code="invalid_value")
    if not isinstance(prompt, str):
        raise _type_error("prompt", "a string", prompt)
    return parse_row({"id": "request", "prompt": prompt, "prefill": prefill}, "request")


def _row(body: dict, kind: str, prefill) -> InputRow:
    row = _chat_row(body, prefill) if kind == "chat" else _completion_row(body, prefill)
    if row.error:
        raise ApiError(400, row.error, param="messages" if kind == "chat" else "prompt", code="invalid_value")
    return row


def _max_tokens(body: dict, limit: int) -> int | None:
    max_tokens = _int(body, "max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", lo=1)
    if max_tokens is not None and max_tokens > limit:
        raise ApiError(400, f"max_tokens={max_tokens} is beyond this server's limit of {limit}",
                       param="max_tokens", code="max_tokens_exceeded")
    return max_tokens


def _stream(body: dict) -> tuple[bool, dict]:
    """`stream` and `stream_options`."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    return stream, opts


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _type_error("stop", "a string or a list of strings", stop)
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise ApiError(400, f"`stop` takes at most {MAX_STOPS} non-empty strings", param="stop", code="invalid_value")
    return stop


def _sampling(method: str, temperature: float | None, top_p: float | None) -> dict:
    """The search-config fields temperature and top_p set: only best-of-n samples."""
    over: dict = {}
    if method != "best-of-n":
        return over
    if temperature is not None:
        if temperature == 0:
            raise ApiError(400, "temperature=0 with method best-of-n: use ggro.method 'greedy' for greedy "
                           "decoding", param="temperature", code="invalid_value")
        over["temperature"] = temperature
    if top_p is not None:
        if top_p == 0:
            raise ApiError(400, "`top_p` must be > 0", param="top_p", code="invalid_value")
        over["top_p"] = top_p
    return over


def _search_config(base: GGROConfig, over: dict) -> GGROConfig:
    try:
        return normalize(dataclasses.replace(base, **over))
    except ConfigError as e:
        raise ApiError(400, f"ggro: {e}", param="ggro", code="invalid_value") from None


def _served(cfg: GGROConfig, vocab_problem: str | None) -> None:
    """The server's reward model can score `cfg`'s method: one of another vocabulary serves only the methods
    that need no gradient (a GGRO request is refused here, before it is admitted or searched)."""
    why = vocab_refusal(vocab_problem, cfg.method)
    if why:
        ok = " or ".join(repr(m) for m in METHODS if not vocab_refusal(vocab_problem, m))
        raise ApiError(400, f"ggro.method {cfg.method!r} is not served here: {why}; ask for ggro.method {ok}",
                       param="ggro.method", code="invalid_value")


def parse_request(body: dict, kind: str, base: GGROConfig, *, model_names: tuple[str, ...],
                  max_tokens_limit: int, vocab_problem: str | None = None) -> ApiRequest:
    """Validate an OpenAI chat/completions body into an ApiRequest (raises ApiError). The checks run in a
    fixed order (model, unsupported fields, ggro knobs, prompt, limits, the method the reward model can
    serve), so a body with several faults always gets the same error. `vocab_problem`: how the server's
    reward model's vocabulary differs from the policy's (ggro.modelset.ModelSet.vocab_problem; None: one vocabulary)."""
    model = _model(body, model_names)
    _check_unsupported(body)
    ggro = _ggro_knobs(body)
    row = _row(body, kind, ggro.get("prefill"))
    max_tokens = _max_tokens(body, max_tokens_limit)
    n = _int(body, "n", lo=1, hi=MAX_CHOICES) or 1
    seed = _int(body, "seed")
    temperature, top_p = _num(body, "temperature", 0.0, 2.0), _num(body, "top_p", 0.0, 1.0)
    stream, opts = _stream(body)
    stop = _stops(body)

    over = {k: v for k, v in ggro.items() if k != "prefill" and v is not None}
    if max_tokens is not None:
        over["max_new_tokens"] = max_tokens
    elif base.max_new_tokens > max_tokens_limit:
        over["max_new_tokens"] = max_tokens_limit
    over.update(_sampling(over.get("method", base.method), temperature, top_p))
    if seed is not None:
        over["seed"] = seed
    cfg = _search_config(base, over)
    _served(cfg, vocab_problem)
    return ApiRequest(kind, row, cfg, n=n, stream=stream, include_usage=bool(opts.get("include_usage")),
                      stop=stop, seeded=seed is not None and uses_randomness(cfg), model=model or model_names[0])


def uses_randomness(cfg: GGROConfig) -> bool:
    return cfg.method == "best-of-n" or (cfg.method == "ggro" and cfg.selection == "sample")


def normalize(cfg: GGROConfig) -> GGROConfig:
    """Reset fields that do not affect this method (each field's `applies`, ggro.config `knob`), so requests
    that behave alike share one search loop."""
    used = {"ggro": cfg.method == "ggro", "best-of-n": cfg.method == "best-of-n", "sampled": uses_randomness(cfg)}
    unused = {f.name: f.default for f in knobs(GGROConfig) if f.metadata["applies"] and not used[f.metadata["applies"]]}
    return dataclasses.replace(cfg, **unused)


# -- responses -----------------------------------------------------------------------------------------
def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut `text` at the first stop string; True if one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stats(result) -> dict:
    """A choice's `ggro` object: the output row's numbers (ggro.schema `result_stats`) with its method."""
    numbers = result_stats(result)
    return {"method": result.method, **numbers, "elapsed_s": round(numbers["elapsed_s"], 4)}


def _object(req: ApiRequest, chunk: bool = False) -> str:
    if req.kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def response_id(req: ApiRequest) -> str:
    return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id


def completion_body(req: ApiRequest, choices: list[dict], prompt_tokens: int) -> dict:
    """`choices`: [{text, finish_reason, tokens, stats}] in choice order."""
    out = []
    for i, c in enumerate(choices):
        ch = {"index": i, "finish_reason": c["finish_reason"], "logprobs": None, "ggro": c["stats"]}
        if req.kind == "chat":
            ch["message"] = {"role": "assistant", "content": c["text"]}
        else:
            ch["text"] = c["text"]
        out.append(ch)
    completion = sum(c["tokens"] for c in choices)
    return {"id": response_id(req), "object": _object(req), "created": req.created, "model": req.model,
            "choices": out, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "ggro": choices[0]["stats"] if len(choices) == 1 else {"choices": [c["stats"] for c in choices]}}


def chunk_body(req: ApiRequest, index: int, text: str | None = None, finish_reason: str | None = None,
               role: bool = False, extra: dict | None = None) -> dict:
    ch: dict = {"index": index, "finish_reason": finish_reason, "logprobs": None}
    if req.kind == "chat":
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        ch["delta"] = delta
    else:
        ch["text"] = text or ""
    if extra:
        ch.update(extra)
    return {"id": response_id(req), "object": _object(req, chunk=True), "created": req.created,
            "model": req.model, "choices": [ch], "system_fingerprint": None}


def usage_chunk(req: ApiRequest, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": response_id(req), "object": _object(req, chunk=True), "created": req.created, "model": req.model,
            "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()
