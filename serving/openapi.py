"""The OpenAPI 3.1 document of the public HTTP API, built from the request limits.

Served at `GET /openapi.json` by the shared routes (a gateway's public port and a worker's
own HTTP port), and fuzzed against a running gateway in CI (tests/e2e/test_openapi_fuzz.py).
Every bound below comes from the `RequestLimits` the parsers enforce (proto/limits.py), so
the document cannot drift from what a server accepts: a body the schema allows parses, and
one it forbids is refused with a 400 naming the field (tests/gateway/test_input_limits.py
checks both ways). What JSON Schema cannot say (an integer written `8.0`, the prompt's total
size across messages, a model the server does not serve, the model's vocabulary and context
length) is said in the descriptions and answered with the documented errors.
"""

from __future__ import annotations

from typing import Any

from proto.limits import DEFAULT_LIMITS, RequestLimits
from proto.openai_compat import ROLES, TEXT_PARTS

Schema = dict[str, Any]

API_VERSION = "0.1.0"
"""`info.version`: the package's (serving may not import breakwater, the SDK)."""

FINISH_REASONS = ["stop", "length", "abort", "error"]

TOP_P_EXCLUSIVE_MIN = 2.0**-150
"""`top_p` travels as a float32: a double at or below half the smallest float32 subnormal
rounds to 0 there, which the parser refuses; anything above it is kept."""

INT32_MAX = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


_UPSTREAM_ONLY = (
    "served where the model server behind the gateway serves it (an OpenAI-compatible one gets "
    "the body as is); Breakwater's engine answers 400."
)


def _or_null(schema: Schema) -> Schema:
    """`schema` or JSON null: the parsers treat a null field as one left out."""
    return {"anyOf": [schema, {"type": "null"}]}


def _int(lo: int, hi: int, description: str) -> Schema:
    return _or_null({"type": "integer", "minimum": lo, "maximum": hi, "description": description})


def _flag(description: str) -> Schema:
    return _or_null({"type": "boolean", "description": description})


def _error_schemas() -> dict[str, Schema]:
    return {
        "Error": {
            "type": "object",
            "description": "Every refusal and failure, as OpenAI answers them.",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {
                            "type": "string",
                            "examples": [
                                "invalid_request_error",
                                "rate_limit_error",
                                "overloaded_error",
                                "service_unavailable",
                                "timeout",
                                "upstream_error",
                                "server_error",
                            ],
                        },
                        "param": {
                            "type": ["string", "null"],
                            "description": "The offending field, e.g. `messages[3].content`.",
                        },
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
    }


def _request_schemas(limits: RequestLimits) -> dict[str, Schema]:
    token_id = {"type": "integer", "minimum": 0, "maximum": limits.max_token_id}
    stop_string = {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars}
    common: dict[str, Schema] = {
        "model": {
            "type": "string",
            "minLength": 1,
            "maxLength": limits.max_model_chars,
            "description": "A model the server serves (GET /v1/models); another is a 404.",
        },
        "stream": _or_null({"type": "boolean", "description": "Answer as server-sent events."}),
        "stream_options": _or_null(
            {
                "type": "object",
                "description": "Only with `stream: true`.",
                "properties": {"include_usage": {"type": "boolean"}},
            }
        ),
        "temperature": _or_null({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _or_null(
            {"type": "number", "exclusiveMinimum": TOP_P_EXCLUSIVE_MIN, "maximum": 1}
        ),
        "top_k": _int(-1, INT32_MAX, "vLLM's extension; -1 means all tokens."),
        "seed": _int(*INT64, "For reproducible sampling."),
        "n": _int(1, 1, "Only one choice per request."),
        "best_of": _int(1, 1, "Only one candidate per request."),
        "presence_penalty": _or_null(
            {"type": "number", "minimum": 0, "maximum": 0, "description": "Not supported."}
        ),
        "frequency_penalty": _or_null(
            {"type": "number", "minimum": 0, "maximum": 0, "description": "Not supported."}
        ),
        "logit_bias": _or_null(
            {"type": "object", "maxProperties": 0, "description": "Not supported."}
        ),
        "stop": _or_null(
            {
                "anyOf": [
                    stop_string,
                    {"type": "array", "maxItems": limits.max_stop, "items": stop_string},
                ]
            }
        ),
        "stop_token_ids": _or_null(
            {"type": "array", "maxItems": limits.max_stop_token_ids, "items": token_id}
        ),
        "ignore_eos": _flag("vLLM's extension: generate past the end-of-sequence token."),
        "include_stop_str_in_output": _flag("vLLM's extension."),
        "skip_special_tokens": _flag("vLLM's extension."),
        "priority": {
            "enum": ["interactive", "batch", 0, 1, None],
            "description": "Admission priority: batch work waits behind interactive.",
        },
        "user": _or_null(
            {"type": "string", "description": "Also the sticky-routing key (first 256 chars)."}
        ),
        "response_format": _or_null(
            {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string"}},
                "description": f"Other than `text`: {_UPSTREAM_ONLY}",
            }
        ),
    }
    # `stream_options` needs `stream: true` (the parser's rule, as a schema).
    stream_rule = {
        "if": {
            "required": ["stream_options"],
            "properties": {"stream_options": {"type": "object"}},
        },
        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
    }
    # `top_logprobs` needs `logprobs: true` (OpenAI's rule, and the parser's).
    top_logprobs_rule = {
        "if": {
            "required": ["top_logprobs"],
            "properties": {"top_logprobs": {"type": "integer"}},
        },
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    }
    # A tool choice other than "none" needs the tools listed (vLLM's rule, and the parser's).
    tool_rules = [
        {
            "if": {
                "required": [choice_name],
                "properties": {choice_name: {"not": {"enum": ["none", None]}}},
            },
            "then": {"required": [name], "properties": {name: {"type": "array"}}},
        }
        for name, choice_name in (("tools", "tool_choice"), ("functions", "function_call"))
    ]
    max_tokens = _int(1, limits.max_tokens, "Also bounded by the model's context length.")
    ids = {
        "type": "array",
        "minItems": 1,
        "maxItems": limits.max_prompt_token_ids,
        "items": token_id,
    }
    prompt_text = {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars}
    tools = _or_null(
        {"type": "array", "items": {"type": "object"}, "description": f"Called: {_UPSTREAM_ONLY}"}
    )
    choice = _or_null({"anyOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]})
    tool_fields = {
        "tools": tools,
        "tool_choice": choice,
        "functions": tools,
        "function_call": choice,
    }
    text_part = {
        "anyOf": [
            {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": [k for k, v in TEXT_PARTS.items() if v == field]},
                    field: {"type": "string", "maxLength": limits.max_message_chars},
                },
            }
            for field in sorted(set(TEXT_PARTS.values()))
        ]
    }
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": sorted(ROLES)},
            "content": {
                "description": f"At most {limits.max_message_chars} characters (text parts "
                "joined, one per line); only text parts (text, input_text, output_text, "
                "refusal).",
                "anyOf": [
                    {"type": "string", "maxLength": limits.max_message_chars},
                    {"type": "array", "items": text_part},
                    {"type": "null"},
                ],
            },
        },
    }
    return {
        "CompletionRequest": {
            "type": "object",
            "description": "Unknown fields are ignored.",
            "required": ["model", "prompt"],
            "properties": {
                **common,
                "prompt": {
                    "description": "Text or token ids (within the model's vocabulary, or a "
                    "400); a batch holds at most "
                    f"{limits.max_batch_prompts} prompt (send one per request).",
                    "anyOf": [
                        prompt_text,
                        ids,
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": limits.max_batch_prompts,
                            "items": {"anyOf": [prompt_text, ids]},
                        },
                    ],
                },
                "max_tokens": max_tokens,
                "logprobs": _int(0, limits.max_logprobs, "Alternatives per token."),
                "echo": {"enum": [False, None], "description": "Not supported."},
                "suffix": _or_null(
                    {"type": "string", "maxLength": 0, "description": "Not supported."}
                ),
            },
            **stream_rule,
        },
        "ChatMessage": message,
        "ChatCompletionRequest": {
            "type": "object",
            "description": f"Unknown fields are ignored. The messages' content may have at "
            f"most {limits.max_prompt_chars} characters in all.",
            "required": ["model", "messages"],
            "properties": {
                **common,
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": limits.max_messages,
                    "items": _ref("ChatMessage"),
                },
                "max_tokens": max_tokens,
                "max_completion_tokens": max_tokens,
                "logprobs": _flag("Return the sampled tokens' log probabilities."),
                "top_logprobs": _int(
                    0, limits.max_logprobs, "Alternatives per token; needs `logprobs: true`."
                ),
                **tool_fields,
            },
            "allOf": [stream_rule, top_logprobs_rule, *tool_rules],
        },
    }


def _response_schemas() -> dict[str, Schema]:
    count = {"type": "integer", "minimum": 0}
    finish = {"enum": [*FINISH_REASONS, None]}
    logprob = {"type": "number"}

    def answer(obj: str, choice: Schema) -> Schema:
        return {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": obj},
                "created": count,
                "model": {"type": "string"},
                "choices": {"type": "array", "items": choice},
                "usage": _ref("Usage"),
            },
        }

    def choice(extra: Schema, required: list[str]) -> Schema:
        return {
            "type": "object",
            "required": ["index", "finish_reason", *required],
            "properties": {"index": count, "finish_reason": finish, **extra},
        }

    chat_token = {
        "type": "object",
        "required": ["token", "logprob", "bytes"],
        "properties": {
            "token": {"type": "string"},
            "logprob": logprob,
            "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
        },
    }
    chat_logprobs = _or_null(
        {
            "type": "object",
            "required": ["content"],
            "properties": {
                "content": {
                    "type": "array",
                    "items": {
                        "allOf": [chat_token],
                        "required": ["top_logprobs"],
                        "properties": {"top_logprobs": {"type": "array", "items": chat_token}},
                    },
                }
            },
        }
    )
    completion_logprobs = _or_null(
        {
            "type": "object",
            "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
            "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "token_logprobs": {"type": "array", "items": logprob},
                "top_logprobs": {
                    "type": "array",
                    "items": {"type": "object", "additionalProperties": logprob},
                },
                "text_offset": {"type": "array", "items": count},
            },
        }
    )
    completion_choice = choice(
        {"text": {"type": "string"}, "logprobs": completion_logprobs}, ["text", "logprobs"]
    )
    return {
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": count,
                "completion_tokens": count,
                "total_tokens": count,
                "prompt_tokens_details": {
                    "type": "object",
                    "properties": {"cached_tokens": count},
                },
            },
        },
        "Completion": answer("text_completion", completion_choice),
        "CompletionChunk": answer("text_completion", completion_choice),
        "ChatCompletion": answer(
            "chat.completion",
            choice(
                {
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": ["string", "null"]},
                        },
                    },
                    "logprobs": chat_logprobs,
                },
                ["message", "logprobs"],
            ),
        ),
        "ChatCompletionChunk": answer(
            "chat.completion.chunk",
            choice(
                {
                    "delta": {
                        "type": "object",
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": ["string", "null"]},
                        },
                    },
                    "logprobs": chat_logprobs,
                },
                ["delta"],
            ),
        ),
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": count,
                "owned_by": {"type": "string"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _ref("Model")},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"const": "ok"},
                "process": {
                    "type": "integer",
                    "description": "Gateway: which of its processes answered (--processes).",
                },
                "routing_shared": {
                    "type": "object",
                    "description": "Gateway: prefix-aware decisions sent to and received "
                    "from its sibling processes and other gateways.",
                    "properties": {
                        "sent": {"type": "integer"},
                        "received": {"type": "integer"},
                    },
                },
                "routing_tokenizers": {
                    "type": "integer",
                    "description": "Gateway: tokenizers this process has loaded (0: it "
                    "routes on text blocks until the workers' tokenizer is loaded).",
                },
                "cache_reports": {
                    "type": "integer",
                    "description": "Gateway: replicas whose prefix-cache reports this "
                    "process follows.",
                },
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "models", "not_ready"],
            "properties": {
                "ready": {"type": "boolean"},
                "models": {"type": "array", "items": {"type": "string"}},
                "not_ready": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


def _headers() -> dict[str, Schema]:
    def header(description: str, schema: Schema, required: bool = False) -> Schema:
        return {"description": description, "required": required, "schema": schema}

    digits = {"type": "string", "pattern": "^[0-9]+$"}
    text = {"type": "string"}
    return {
        "X-Request-Id": header(
            "The request's id (the caller's, or one made up).", {"type": "string"}
        ),
        "RetryAfter": header("Seconds to wait before retrying.", digits, required=True),
        "RetryAfterMs": header("Milliseconds to wait before retrying.", digits),
        "ShouldRetry": header(
            "Whether a retry is welcome (the OpenAI SDKs obey it).",
            {"enum": ["true", "false"]},
        ),
        "Attempts": header("Upstream attempts the gateway made.", digits),
        "Worker": header("The replica that answered.", text),
    }


def _sse(chunk: str) -> Schema:
    """One server-sent event (OpenAPI before 3.2 has `schema` describe each event): a JSON
    chunk, an error object that ends the stream, or the final `[DONE]`."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "if": {"not": {"const": "[DONE]"}},
                    "then": {
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]},
                    },
                }
            },
        }
    }


def _error(description: str, *, retry_after: bool = False) -> Schema:
    headers: dict[str, Schema] = {
        "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"},
        "x-should-retry": {"$ref": "#/components/headers/ShouldRetry"},
    }
    if retry_after:
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
        headers["retry-after-ms"] = {"$ref": "#/components/headers/RetryAfterMs"}
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


ERRORS: dict[str, tuple[str, bool]] = {
    "400": ("A field is invalid (`error.param` names it), or the body is not JSON.", False),
    "401": ("A missing or unknown API key (when the gateway has tenants' keys).", False),
    "404": ("The model is not served here.", False),
    "408": ("The body did not arrive in time.", False),
    "413": ("The body is larger than the limit.", False),
    "429": ("A tenant's rate limit or concurrency limit.", True),
    "502": ("The upstream failed or answered something malformed.", False),
    "503": ("Overloaded, or no replica can serve the model now.", True),
    "504": ("The deadline (X-Request-Timeout-Ms, or the server's) passed.", False),
}


def _generate(path_kind: str, summary: str) -> Schema:
    request, whole, chunk = {
        "completion": ("CompletionRequest", "Completion", "CompletionChunk"),
        "chat": ("ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
    }[path_kind]
    ok_headers = {
        "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"},
        "x-breakwater-attempts": {"$ref": "#/components/headers/Attempts"},
        "x-breakwater-worker": {"$ref": "#/components/headers/Worker"},
    }
    return {
        "post": {
            "operationId": "create_chat_completion" if path_kind == "chat" else "create_completion",
            "summary": summary,
            "parameters": [
                {"$ref": "#/components/parameters/RequestTimeout"},
                {"$ref": "#/components/parameters/RequestId"},
                {"$ref": "#/components/parameters/SessionId"},
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": {
                    "description": "The answer: JSON, or server-sent events with `stream`.",
                    "headers": ok_headers,
                    "content": {
                        "application/json": {"schema": _ref(whole)},
                        "text/event-stream": _sse(chunk),
                    },
                },
                **{
                    status: _error(text, retry_after=retry)
                    for status, (text, retry) in ERRORS.items()
                },
            },
        }
    }


def _get(operation_id: str, summary: str, responses: dict[str, Schema]) -> Schema:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


def _json(description: str, schema: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def build_openapi(limits: RequestLimits = DEFAULT_LIMITS, *, metrics: bool = True) -> Schema:
    """The document for a server enforcing `limits` (with `/metrics` when it serves it)."""
    paths: dict[str, Schema] = {
        "/v1/completions": _generate("completion", "Complete a prompt (OpenAI-compatible)."),
        "/v1/chat/completions": _generate("chat", "Answer a chat (OpenAI-compatible)."),
        "/v1/models": _get(
            "list_models", "The models served.", {"200": _json("The models.", "ModelList")}
        ),
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieve_model",
                "summary": "One model served (OpenAI's models.retrieve).",
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                    }
                ],
                "responses": {
                    "200": _json("The model.", "Model"),
                    "404": _json("No such model.", "Error"),
                },
            }
        },
        "/healthz": _get(
            "healthz", "Liveness: the process answers.", {"200": _json("Alive.", "Health")}
        ),
        "/readyz": _get(
            "readyz",
            "Readiness: every model has a replica ready.",
            {
                "200": _json("Ready.", "Readiness"),
                "503": _json("Not ready (no model, or one without a ready replica).", "Readiness"),
            },
        ),
        "/openapi.json": _get(
            "openapi",
            "This document.",
            {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}},
        ),
    }
    if metrics:
        paths["/metrics"] = _get(
            "metrics",
            "Prometheus metrics.",
            {
                "200": {
                    "description": "The text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Breakwater",
            "version": API_VERSION,
            "description": "OpenAI-compatible inference API of a Breakwater gateway or worker. "
            f"Request bodies are at most {limits.max_body_bytes} bytes (413 past it). "
            "An integer is a JSON number written without a fraction or exponent (`8`, not "
            "`8.0`), which JSON Schema's `integer` does not say.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                **_error_schemas(),
                **_request_schemas(limits),
                **_response_schemas(),
            },
            "headers": _headers(),
            "parameters": {
                "RequestTimeout": {
                    "name": "X-Request-Timeout-Ms",
                    "in": "header",
                    "description": "The caller's deadline in milliseconds (decimals accepted), "
                    "capped by the server's maximum; past it the answer is a 504.",
                    "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"},
                },
                "RequestId": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "description": "The request's id, echoed back and passed upstream (one is "
                    "made up when absent or empty).",
                    "schema": {
                        "type": "string",
                        "maxLength": limits.max_request_id_chars,
                        "pattern": "^[ -~]*$",
                    },
                },
                "SessionId": {
                    "name": "X-Session-Id",
                    "in": "header",
                    "description": "The gateway's sticky-routing key (overrides `user`).",
                    "schema": {"type": "string"},
                },
            },
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's key, when the gateway is given tenants' keys.",
                }
            },
        },
        "security": [{}, {"apiKey": []}],
    }
