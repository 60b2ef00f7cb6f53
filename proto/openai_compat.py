"""OpenAI JSON <-> the Generate contract: request parsing and response building.

Shared by the gateway's HTTP front end, a worker's own HTTP port and the OpenAI-HTTP
upstream, so that every OpenAI surface of Breakwater validates and answers alike.
Imports only protobuf stubs: safe for the gateway, which never imports torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson

from proto import inference_pb2 as pb
from proto.limits import DEFAULT_LIMITS, RequestLimits

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}
FINISH_FROM_NAME = {v: k for k, v in FINISH_REASONS.items()}


class OpenAIError(Exception):
    """An error to answer with an OpenAI-style body and this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_ms = retry_after_ms
        self.should_retry: bool | None = None
        """Said to the client as `x-should-retry` (the openai SDK obeys it): False once
        the gateway's door retry budget is spent, so a refusal is not retried into a storm."""
        self.tenant: str | None = None
        self.key_id: str | None = None
        """Whose request admission refused, once it knew (for the request log)."""

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


@dataclass
class ParsedRequest:
    """A parsed OpenAI request: the wire request plus what shapes the HTTP answer."""

    request: pb.GenerateRequest
    kind: str  # "completion" or "chat"
    stream: bool
    include_usage: bool
    logprobs: int | None
    unsupported: OpenAIError | None = None
    """A feature asked for that the Generate contract cannot carry (tool calls, structured
    output): the refusal a Breakwater engine answers with. Not raised by the parser, since
    the gateway relays such a body untouched to an OpenAI-compatible upstream that may
    serve it; it refuses only a request bound for the Generate contract."""


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"'{name}' must be a number", name)
    # Compared before float(): a huge integer is refused, not overflowed.
    if not (isinstance(v, int) or math.isfinite(v)) or not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}", name)
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int, hi: int = 2**31 - 1) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and abs(v) >= 2**64:  # orjson reads a longer integer so
            raise bad(f"'{name}' must be between {lo} and {hi}", name)
        raise bad(f"'{name}' must be an integer", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}", name)
    return v


def _bool(body: dict[str, Any], name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean", name)
    return v


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _token_ids(value: list[int], name: str, most: int, limits: RequestLimits) -> list[int]:
    """Token ids as the Generate contract carries them (int32, never negative)."""
    if len(value) > most:
        raise bad(f"'{name}' has {len(value)} token ids; at most {most} are allowed", name)
    if not all(0 <= t <= limits.max_token_id for t in value):
        raise bad(f"'{name}' token ids must be between 0 and {limits.max_token_id}", name)
    return value


MAX_SESSION_KEY = 256
"""Characters of a session key (or `user`) kept for sticky routing."""


MAX_CLIENT_SALT = 128
"""The longest `cache_salt` taken (a gateway isolating tenants sends its tenant's 41
characters, ':' and a 32-character digest of the client's own)."""


def session_key(value: str) -> str:
    """A sticky-routing key as the wire carries it: its first MAX_SESSION_KEY characters, as
    valid UTF-8. An HTTP header's undecodable bytes arrive as lone surrogates, which protobuf
    refuses; they become U+FFFD (the key only has to be stable, not exact)."""
    key = value[:MAX_SESSION_KEY]
    if key.isascii():
        return key
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in key)


def check_request_id(value: str, param: str, limits: RequestLimits = DEFAULT_LIMITS) -> None:
    """A caller's request id: echoed in headers and passed upstream as gRPC metadata, so
    printable ASCII of bounded length (anything else fails there, not here)."""
    most = limits.max_request_id_chars
    if len(value) > most or not all(" " <= c <= "~" for c in value):
        raise bad(f"'{param}' must be at most {most} printable ASCII characters", param)


_PRIORITIES: dict[str | int, int] = {
    "interactive": pb.PRIORITY_INTERACTIVE,
    "batch": pb.PRIORITY_BATCH,
    0: pb.PRIORITY_INTERACTIVE,
    1: pb.PRIORITY_BATCH,
}


def _stops(body: dict[str, Any], sp: pb.SamplingParams, limits: RequestLimits) -> None:
    """`stop` (bounded like OpenAI's) and vLLM's `stop_token_ids`."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("'stop' must be a non-empty string or a list of them", "stop")
        if len(stop) > limits.max_stop:
            raise bad(f"at most {limits.max_stop} stop sequences are allowed", "stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            most = limits.max_stop_chars
            raise bad(f"a stop sequence may have at most {most} characters", "stop")
        sp.stop.extend(stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not _is_ids(ids):
            raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        sp.stop_token_ids.extend(
            _token_ids(ids, "stop_token_ids", limits.max_stop_token_ids, limits)
        )


def _common(body: dict[str, Any], req: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Sampling fields shared by both endpoints (with vLLM's extensions)."""
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise bad("'user' must be a string", "user")
        req.session_key = session_key(user)
    salt = body.get("cache_salt")
    if salt is not None:
        if not isinstance(salt, str) or not salt or len(salt) > MAX_CLIENT_SALT:
            raise bad(
                f"'cache_salt' must be a non-empty string of at most {MAX_CLIENT_SALT} characters",
                "cache_salt",
            )
        req.cache_salt = salt
    sp = req.sampling
    if (t := _number(body, "temperature", 0, 2)) is not None:
        sp.temperature = t
    if (p := _number(body, "top_p", 0, 1)) is not None:
        sp.top_p = p
        if sp.top_p == 0:  # also a tiny value that rounds to 0 as the wire's float32
            raise bad("'top_p' must be greater than 0", "top_p")
    if (k := _int(body, "top_k", -1)) is not None:
        sp.top_k = k
    if (seed := _int(body, "seed", -(2**63), 2**63 - 1)) is not None:
        sp.seed = seed
    if _int(body, "n", 1) not in (None, 1):
        raise bad("only n=1 is supported", "n")
    if _int(body, "best_of", 1) not in (None, 1):
        raise bad("only best_of=1 is supported", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2, 2):
            raise bad(f"'{name}' is not supported", name)
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise bad("'logit_bias' must be an object", "logit_bias")
    if bias:
        raise bad("'logit_bias' is not supported", "logit_bias")
    _stops(body, sp, limits)
    for flag in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        if (v := _bool(body, flag)) is not None:
            setattr(sp, flag, v)
    prio = body.get("priority")
    if prio is not None:
        if isinstance(prio, bool) or not isinstance(prio, str | int) or prio not in _PRIORITIES:
            raise bad("'priority' must be 'interactive' or 'batch'", "priority")
        req.priority = _PRIORITIES[prio]


def _model(body: dict[str, Any], limits: RequestLimits) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required", "model")
    if len(model) > limits.max_model_chars:
        raise bad(f"'model' may have at most {limits.max_model_chars} characters", "model")
    return model


def _max_tokens(body: dict[str, Any], name: str, limits: RequestLimits) -> int | None:
    return _int(body, name, 1, limits.max_tokens)


def _stream_flags(body: dict[str, Any], req: pb.GenerateRequest) -> tuple[bool, bool]:
    stream = body.get("stream")
    stream = False if stream is None else stream  # null is "not set", as OpenAI and vLLM take it
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        flag = opts.get("include_usage", False)
        if not isinstance(flag, bool):
            raise bad("'include_usage' must be a boolean", "stream_options.include_usage")
        include_usage = flag
    # The gateway always needs usage from its upstream, whatever the client asked.
    req.stream_options.include_usage = True
    return stream, include_usage


def _prompt(body: dict[str, Any], req: pb.GenerateRequest, limits: RequestLimits) -> None:
    """`prompt`: a string or token ids, or a batch (list) of those of at most
    `max_batch_prompts` (a batch of one is unwrapped)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > limits.max_batch_prompts:
            raise bad(
                f"a batch of {len(prompt)} prompts; at most {limits.max_batch_prompts} per "
                "request is supported (send one prompt per request)",
                "prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' must not be empty", "prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise bad(
                f"'prompt' has {len(prompt)} characters; at most {limits.max_prompt_chars} "
                "are allowed",
                "prompt",
            )
        req.text = prompt
    elif prompt and _is_ids(prompt):
        req.token_ids.ids.extend(_token_ids(prompt, "prompt", limits.max_prompt_token_ids, limits))
    else:
        raise bad("'prompt' must be a string or a list of token ids", "prompt")


_TOOL_CHOICES = frozenset(("none", "auto", "required"))
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
"""vLLM's own structured-output fields."""
_VLLM_SAMPLING: dict[str, object] = {
    "repetition_penalty": 1,
    "min_p": 0,
    "min_tokens": 0,
    "length_penalty": 1,
    "use_beam_search": False,
    "allowed_token_ids": None,
    "bad_words": None,
    "truncate_prompt_tokens": None,
    "prompt_logprobs": None,
}
"""vLLM's sampling fields Breakwater's engine does not implement, and the value that asks
for nothing: ignored, they would change nothing where a vLLM user expects them to."""


def _engine_features(body: dict[str, Any], chat: bool) -> OpenAIError | None:
    """Checks the shape of the fields that ask for tool calls or structured output (a 400
    now, on every path) and says which one asks for what a Breakwater engine cannot do.

    Ignoring them would answer an agent's tool call, or a request for JSON, with free text
    that looks like success. vLLM refuses automatic tool choice without a tool parser the
    same way. `tool_choice: "none"` (tools listed but not to be called) is served.
    """
    found: OpenAIError | None = None
    if chat:
        for name, choice_name in (("tools", "tool_choice"), ("functions", "function_call")):
            items, choice = body.get(name), body.get(choice_name)
            if items is not None and (
                not isinstance(items, list) or not all(isinstance(t, dict) for t in items)
            ):
                raise bad(f"'{name}' must be a list of objects", name)
            if choice is not None and not (
                isinstance(choice, dict) or (isinstance(choice, str) and choice in _TOOL_CHOICES)
            ):
                raise bad(
                    f"'{choice_name}' must be 'none', 'auto', 'required' or an object", choice_name
                )
            if choice is not None and choice != "none" and items is None:
                raise bad(f"'{choice_name}' needs '{name}'", choice_name)  # vLLM's rule
            if found is None and items and choice != "none":
                how = choice if isinstance(choice, str | None) else "a named function"
                found = bad(
                    f"tool calling ('{name}' with '{choice_name}' {how or 'auto'}) is not "
                    f"supported by Breakwater's engine; send '{choice_name}': 'none' to have "
                    "the model answer in text",
                    name,
                )
    for name in _GUIDED:
        if found is None and body.get(name) is not None:
            found = bad(
                f"'{name}' (structured output) is not supported by Breakwater's engine", name
            )
    for name, no_op in _VLLM_SAMPLING.items():
        value = body.get(name)
        if found is None and value is not None and value != no_op and value != []:
            found = bad(
                f"'{name}' (vLLM's sampling extension) is not supported by Breakwater's engine",
                name,
            )
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if not isinstance(kind, str):
            raise bad("'response_format' must be an object with a string 'type'", "response_format")
        if found is None and kind != "text":
            found = bad(
                f"'response_format' of type '{kind[:40]}' (structured output) is not supported by "
                "Breakwater's engine",
                "response_format",
            )
    return found


def parse_completion(body: Any, limits: RequestLimits = DEFAULT_LIMITS) -> ParsedRequest:
    """A /v1/completions body as a Generate request; OpenAIError (400) when invalid."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    req = pb.GenerateRequest(model=_model(body, limits))
    _prompt(body, req, limits)
    if _bool(body, "echo"):
        raise bad("'echo' is not supported", "echo")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("'suffix' must be a string", "suffix")
    if suffix:
        raise bad("'suffix' is not supported", "suffix")
    mt = _max_tokens(body, "max_tokens", limits)
    req.sampling.max_tokens = 16 if mt is None else mt  # OpenAI's default for completions
    logprobs = _int(body, "logprobs", 0, limits.max_logprobs)
    if logprobs is not None:
        req.sampling.logprobs = logprobs
    _common(body, req, limits)
    stream, include_usage = _stream_flags(body, req)
    unsupported = _engine_features(body, chat=False)
    return ParsedRequest(req, "completion", stream, include_usage, logprobs, unsupported)


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
"""Message roles OpenAI's chat API defines."""


TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
"""Content parts taken as text (vLLM's set), and the field holding it: an assistant turn
replayed with its refusal part was a 400."""


def _content_text(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PARTS:
                raise bad("only text content parts are supported", param)
            text = part.get(TEXT_PARTS[kind], "")
            if not isinstance(text, str):
                raise bad(f"a {kind} content part's '{TEXT_PARTS[kind]}' must be a string", param)
            parts.append(text)
        # one per line, as vLLM renders them: joined without a separator, two parts' words
        # ran together and the prompt differed from vLLM's for the same messages
        return "\n".join(parts)
    raise bad("message content must be a string or a list of parts", param)


def _messages(body: dict[str, Any], req: pb.GenerateRequest, limits: RequestLimits) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise bad(
            f"{len(messages)} messages; at most {limits.max_messages} are allowed", "messages"
        )
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad("each message must be an object", f"messages[{i}]")
        role = _role(m.get("role"), f"messages[{i}].role")
        text = _content_text(m.get("content"), i)
        total = _message_size(text, total, "messages", i, limits)
        req.chat.messages.add(role=role, content=text)
    req.chat.add_generation_prompt = True


def _role(role: Any, param: str) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise bad(f"'{param}' must be one of {', '.join(sorted(ROLES))}", param)
    return role


def _message_size(text: str, total: int, name: str, i: int, limits: RequestLimits) -> int:
    """The characters of messages so far, with message `i` (`text`) within the bounds."""
    if len(text) > limits.max_message_chars:
        param = f"{name}[{i}].content"
        raise bad(f"'{param}' may have at most {limits.max_message_chars} characters", param)
    total += len(text)
    if total > limits.max_prompt_chars:
        most = limits.max_prompt_chars
        raise bad(f"the '{name}' have more than {most} characters in all", name)
    return total


def parse_chat(body: Any, limits: RequestLimits = DEFAULT_LIMITS) -> ParsedRequest:
    """A /v1/chat/completions body as a Generate request; OpenAIError (400) when invalid."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    req = pb.GenerateRequest(model=_model(body, limits))
    _messages(body, req, limits)
    # Both are checked; the newer name wins when a client sends the two.
    mct = _max_tokens(body, "max_completion_tokens", limits)
    mt = _max_tokens(body, "max_tokens", limits)
    if (chosen := mt if mct is None else mct) is not None:
        req.sampling.max_tokens = chosen
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, limits.max_logprobs)
    if top is not None and not want:  # OpenAI's and vLLM's rule
        raise bad("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    logprobs = None
    if want:
        logprobs = top or 0
        req.sampling.logprobs = logprobs
    _common(body, req, limits)
    stream, include_usage = _stream_flags(body, req)
    unsupported = _engine_features(body, chat=True)
    return ParsedRequest(req, "chat", stream, include_usage, logprobs, unsupported)


def check_generate(req: pb.GenerateRequest, limits: RequestLimits = DEFAULT_LIMITS) -> None:
    """The parsers' bounds on a Generate request taken as is (the gateway's gRPC front end):
    OpenAIError (400) naming the field, before admission, tokenizing or routing spend work.
    Fields are named as the proto names them (`sampling.max_tokens`, `chat.messages[2]`)."""
    check_request_id(req.request_id, "request_id", limits)
    if len(req.model) > limits.max_model_chars:
        raise bad(f"'model' may have at most {limits.max_model_chars} characters", "model")
    which = req.WhichOneof("prompt")
    if which == "text":
        if len(req.text) > limits.max_prompt_chars:
            most = limits.max_prompt_chars
            raise bad(f"'text' has {len(req.text)} characters; at most {most} are allowed", "text")
        if not req.text:
            raise bad("'text' must not be empty", "text")
    elif which == "token_ids":
        if not req.token_ids.ids:
            raise bad("'token_ids' must not be empty", "token_ids")
        _token_ids(list(req.token_ids.ids), "token_ids", limits.max_prompt_token_ids, limits)
    elif which == "chat":
        messages = req.chat.messages
        if not messages:
            raise bad("'chat.messages' must not be empty", "chat.messages")
        if len(messages) > limits.max_messages:
            most = limits.max_messages
            raise bad(
                f"'chat.messages' has {len(messages)}; at most {most} are allowed", "chat.messages"
            )
        total = 0
        for i, m in enumerate(messages):
            _role(m.role, f"chat.messages[{i}].role")
            total = _message_size(m.content, total, "chat.messages", i, limits)
    else:
        raise bad("the request has no prompt: set 'text', 'token_ids' or 'chat'", "prompt")
    _check_sampling(req.sampling, limits)
    if req.priority not in (pb.PRIORITY_INTERACTIVE, pb.PRIORITY_BATCH):
        raise bad("'priority' must be PRIORITY_INTERACTIVE or PRIORITY_BATCH", "priority")
    if len(req.cache_salt) > MAX_CLIENT_SALT:
        raise bad(f"'cache_salt' may have at most {MAX_CLIENT_SALT} characters", "cache_salt")


def _check_sampling(sp: pb.SamplingParams, limits: RequestLimits) -> None:
    def between(name: str, lo: float, hi: float) -> None:
        if sp.HasField(name) and not lo <= getattr(sp, name) <= hi:  # NaN fails too
            raise bad(f"'sampling.{name}' must be between {lo} and {hi}", f"sampling.{name}")

    between("max_tokens", 1, limits.max_tokens)
    between("temperature", 0, 2)
    between("top_p", 0, 1)
    if sp.HasField("top_p") and sp.top_p == 0:
        raise bad("'sampling.top_p' must be greater than 0", "sampling.top_p")
    between("top_k", -1, 2**31 - 1)
    between("logprobs", 0, limits.max_logprobs)
    if len(sp.stop) > limits.max_stop:
        most = limits.max_stop
        raise bad(f"'sampling.stop' has more than {most} stop sequences", "sampling.stop")
    if not all(0 < len(s) <= limits.max_stop_chars for s in sp.stop):
        most = limits.max_stop_chars
        raise bad(f"each of 'sampling.stop' must have 1 to {most} characters", "sampling.stop")
    most = limits.max_stop_token_ids
    _token_ids(list(sp.stop_token_ids), "sampling.stop_token_ids", most, limits)


# -- responses -------------------------------------------------------------------------------


def usage_json(u: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


LOWEST_LOGPROB = -9999.0
"""What a -inf log probability is written as (JSON has no -inf: orjson writes null), as
vLLM does."""


def _logprob(x: float) -> float:
    return x if x >= LOWEST_LOGPROB else LOWEST_LOGPROB


def _completion_logprobs(items: list[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for lp in items:
        tokens.append(lp.token)
        lps.append(_logprob(lp.logprob))
        # the sampled token first, then the alternatives (logprobs: N gives up to N + 1),
        # as OpenAI's legacy completions and vLLM answer
        top = {lp.token: _logprob(lp.logprob)}
        for t in lp.top:
            top.setdefault(t.token, _logprob(t.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(items: list[pb.TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}

    return {
        "content": [
            {
                **entry(lp.token, lp.logprob),
                "top_logprobs": [entry(t.token, t.logprob) for t in lp.top],
            }
            for lp in items
        ]
    }


class ResponseBuilder:
    """Turns the upstream's deltas into OpenAI JSON, streamed or whole."""

    def __init__(self, parsed: ParsedRequest, request_id: str, model: str) -> None:
        self.parsed = parsed
        self.model = model
        self.created = int(time.time())
        prefix = "chatcmpl-" if parsed.kind == "chat" else "cmpl-"
        self.id = prefix + request_id
        self.text: list[str] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.finish_reason: str | None = None
        self.usage: pb.Usage | None = None
        self._text_offset = 0
        self._sent_role = False

    def add(self, resp: pb.GenerateResponse) -> None:
        self.text.append(resp.text)
        self.logprobs.extend(resp.logprobs)
        if resp.finish_reason:
            self.finish_reason = FINISH_REASONS[resp.finish_reason]
        if resp.HasField("usage"):
            self.usage = resp.usage

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self) -> dict[str, Any]:
        text = "".join(self.text)
        lp = self.parsed.logprobs is not None
        if self.parsed.kind == "chat":
            out = self._base("chat.completion")
            out["choices"] = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": _chat_logprobs(self.logprobs) if lp else None,
                    "finish_reason": self.finish_reason,
                }
            ]
        else:
            out = self._base("text_completion")
            out["choices"] = [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": _completion_logprobs(self.logprobs, 0) if lp else None,
                    "finish_reason": self.finish_reason,
                }
            ]
        if self.usage is not None:
            out["usage"] = usage_json(self.usage)
        return out

    def chunks(self, resp: pb.GenerateResponse) -> list[dict[str, Any]]:
        """SSE payloads for one upstream delta (usage goes last, in its own chunk)."""
        finish = FINISH_REASONS.get(resp.finish_reason) if resp.finish_reason else None
        lp = self.parsed.logprobs is not None
        out: list[dict[str, Any]] = []
        if self.parsed.kind == "chat":
            if not self._sent_role:
                self._sent_role = True
                first = self._base("chat.completion.chunk")
                first["choices"] = [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
                out.append(first)
            if resp.text or finish or resp.logprobs:
                c = self._base("chat.completion.chunk")
                c["choices"] = [
                    {
                        "index": 0,
                        "delta": {"content": resp.text} if resp.text else {},
                        "logprobs": _chat_logprobs(list(resp.logprobs)) if lp else None,
                        "finish_reason": finish,
                    }
                ]
                out.append(c)
        elif resp.text or finish or resp.logprobs:
            c = self._base("text_completion")
            c["choices"] = [
                {
                    "index": 0,
                    "text": resp.text,
                    "logprobs": _completion_logprobs(list(resp.logprobs), self._text_offset)
                    if lp
                    else None,
                    "finish_reason": finish,
                }
            ]
            self._text_offset += len(resp.text)
            out.append(c)
        if finish and self.parsed.include_usage and resp.HasField("usage"):
            u = self._base(
                "chat.completion.chunk" if self.parsed.kind == "chat" else "text_completion"
            )
            u["choices"] = []
            u["usage"] = usage_json(resp.usage)
            out.append(u)
        return out


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event. JSON is encoded on one line (orjson escapes control
    characters); a text payload with line breaks becomes several `data:` lines, which a
    client joins back with newlines, so no payload can end its event early."""
    if not isinstance(payload, str):
        return b"data: " + orjson.dumps(payload) + b"\n\n"
    lines = payload.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


# -- the reverse direction, for fronting OpenAI-compatible servers --------------------------


def to_openai_body(req: pb.GenerateRequest) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of the OpenAI request equivalent to a Generate request."""
    sp = req.sampling
    body: dict[str, Any] = {
        "model": req.model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
        if sp.HasField(name):
            body[name] = getattr(sp, name)
    if sp.stop:
        body["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        body["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.ignore_eos:
        body["ignore_eos"] = True
    if sp.include_stop_str_in_output:  # vLLM's extensions, as its own server takes them
        body["include_stop_str_in_output"] = True
    if sp.HasField("skip_special_tokens"):
        body["skip_special_tokens"] = sp.skip_special_tokens
    if req.cache_salt:  # vLLM's field too
        body["cache_salt"] = req.cache_salt
    which = req.WhichOneof("prompt")
    if which == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        if sp.HasField("logprobs"):
            body["logprobs"] = True
            body["top_logprobs"] = sp.logprobs
        return "/v1/chat/completions", body
    body["prompt"] = req.text if which == "text" else list(req.token_ids.ids)
    if sp.HasField("logprobs"):
        body["logprobs"] = sp.logprobs
    return "/v1/completions", body


def _malformed(what: str) -> OpenAIError:
    return OpenAIError(502, f"malformed upstream stream chunk: {what}", "upstream_error")


def _count(obj: dict[str, Any], name: str) -> int:
    v = obj.get(name) or 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
        raise _malformed(f"'{name}' is not a token count")
    return v


def from_openai_chunk(chunk: Any, request_id: str) -> pb.GenerateResponse:
    """One OpenAI stream chunk (completion or chat) as a Generate delta.

    The chunk comes from another server: a field of the wrong type raises OpenAIError
    (502, upstream_error) rather than whatever Python or protobuf would raise.
    """
    if not isinstance(chunk, dict):
        raise _malformed("not an object")
    resp = pb.GenerateResponse(request_id=request_id)
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise _malformed("'choices' is not a list")
    if choices:
        c = choices[0]
        if not isinstance(c, dict):
            raise _malformed("a choice is not an object")
        if "delta" in c:
            delta = c.get("delta") or {}
            if not isinstance(delta, dict):
                raise _malformed("'delta' is not an object")
            text = delta.get("content")
        else:
            text = c.get("text")
        if text is not None and not isinstance(text, str):
            raise _malformed("the text is not a string")
        resp.text = text or ""
        fr = c.get("finish_reason")
        if fr:
            if not isinstance(fr, str):
                raise _malformed("'finish_reason' is not a string")
            resp.finish_reason = FINISH_FROM_NAME.get(fr, pb.FINISH_REASON_STOP)
        sr = c.get("stop_reason")  # vLLM's: the stop string (or token id) that ended it
        if isinstance(sr, str | int) and not isinstance(sr, bool):
            resp.stop_reason = str(sr)[:1024]
    u = chunk.get("usage")
    if u:
        if not isinstance(u, dict):
            raise _malformed("'usage' is not an object")
        details = u.get("prompt_tokens_details") or {}
        if not isinstance(details, dict):
            raise _malformed("'prompt_tokens_details' is not an object")
        resp.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=_count(u, "prompt_tokens"),
                completion_tokens=_count(u, "completion_tokens"),
                cached_prompt_tokens=_count(details, "cached_tokens"),
            )
        )
    return resp
