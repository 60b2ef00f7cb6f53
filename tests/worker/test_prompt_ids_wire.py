"""A prompt's token ids as a gateway sends them and a worker takes them (proto/prompt_ids.py,
worker/proto_convert.py): only with the worker's own tokenizer fingerprint on them."""

from __future__ import annotations

import orjson
import pytest

from proto import inference_pb2 as pb
from proto.openai_compat import OpenAIError
from proto.prompt_ids import (
    BODY_FIELD,
    fits_with_ids,
    parse_body_field,
    prompt_ids_bytes,
    prompt_ids_from,
    with_body_field,
)
from worker.proto_convert import to_engine_request

IDS = [0, 1, 70_000, 2**32 - 1]


def test_ids_travel_in_a_relayed_body_and_the_last_field_wins() -> None:
    hint = pb.PromptIds(ids=prompt_ids_bytes(IDS), tokenizer="abc")
    for body in (b'{"model":"m"}', b'{ "model": "m" }\n', b"{}", b'{"breakwater_prompt":1}'):
        doc = orjson.loads(with_body_field(body, hint))
        got = parse_body_field(doc[BODY_FIELD])
        assert prompt_ids_from(got.ids) == IDS and got.tokenizer == "abc"


@pytest.mark.parametrize(
    "value",
    [
        1,
        {},
        {"token_ids": "AAAA"},
        {"token_ids": 5, "tokenizer": "x"},
        {"token_ids": "!", "tokenizer": "x"},
    ],
)
def test_a_malformed_body_field_is_a_400(value: object) -> None:
    with pytest.raises(OpenAIError) as e:
        parse_body_field(value)
    assert e.value.status == 400 and e.value.param == BODY_FIELD


def test_a_worker_takes_ids_only_with_its_fingerprint() -> None:
    req = pb.GenerateRequest(model="m")
    req.chat.messages.add(role="user", content="hi")
    req.prompt_ids.CopyFrom(pb.PromptIds(ids=prompt_ids_bytes([5, 6, 7]), tokenizer="fp"))
    assert to_engine_request(req, "a", "fp").pretokenized == [5, 6, 7]
    taken = to_engine_request(req, "b", "fp")
    assert taken.messages == [{"role": "user", "content": "hi"}]  # kept: errors name them
    assert to_engine_request(req, "c", "other").pretokenized is None
    assert to_engine_request(req, "d").pretokenized is None  # an engine without one (vLLM)
    req.prompt_ids.ids = b"\x01\x02\x03"  # not whole ids: tokenized as always
    assert to_engine_request(req, "e", "fp").pretokenized is None


def test_ids_that_would_push_a_body_past_the_workers_limit_stay_behind() -> None:
    hint = pb.PromptIds(ids=prompt_ids_bytes(range(3000)), tokenizer="abcdef0123456789")
    body = b'{"model":"m","prompt":"' + b"x" * 1000 + b'"}'
    spliced = with_body_field(body, hint)
    for limit in range(len(spliced) - 8, len(spliced) + 80):  # never an underestimate
        assert not fits_with_ids(body, hint, limit) or len(spliced) <= limit
    assert fits_with_ids(body, hint, len(spliced) + 64)
    assert not fits_with_ids(b"{" + b" " * (4 << 20) + b"}", hint)  # the default: 4 MiB


def test_more_ids_than_the_text_could_make_are_not_taken() -> None:
    req = pb.GenerateRequest(model="m", text="hi")
    req.prompt_ids.CopyFrom(pb.PromptIds(ids=prompt_ids_bytes([1] * 10), tokenizer="fp"))
    assert to_engine_request(req, "a", "fp").pretokenized == [1] * 10
    req.prompt_ids.ids = prompt_ids_bytes([1] * 5000)  # a long prompt passed off as "hi"
    assert to_engine_request(req, "b", "fp").pretokenized is None
