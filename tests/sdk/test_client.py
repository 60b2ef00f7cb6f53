"""The client SDK against the fake gateway (tests/sdk/openai_fake.py).

Timing assertions use lower bounds (a wait honoured) and generous upper bounds (a wait
not taken), so a loaded machine slows the tests down without failing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from breakwater.client import AsyncClient, Client, RetryPolicy, retry_after_seconds
from breakwater.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
    UnprocessableEntityError,
)
from breakwater.types import ChatCompletion, ChatCompletionChunk, Usage
from tests.sdk.openai_fake import MODEL, FakeGateway, Reply, error_reply

MESSAGES = [{"role": "user", "content": "Say hello"}]
TEXT = "Hello, world"


def fast_policy(max_retries: int = 2) -> RetryPolicy:
    """Jitter of zero: any wait we observe was asked for by the server's Retry-After.
    Adaptive throttling off: after one failure it would shed the retry half of the time,
    and these tests are about the retry mechanics (test_resilience.py covers throttling)."""
    return RetryPolicy(
        max_retries=max_retries, initial_backoff=0.0, max_backoff=0.0, throttle_k=None
    )


@pytest.fixture
def client(fake: FakeGateway) -> Iterator[Client]:
    with Client(fake.url, api_key="sk-test", timeout=30, retry_policy=fast_policy()) as c:
        yield c


@pytest.fixture
async def aclient(fake: FakeGateway) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(fake.url, timeout=30, retry_policy=fast_policy()) as c:
        yield c


def vouched(status: int) -> Reply:
    """An error the server says is safe to retry (`x-should-retry: true`)."""
    reply = error_reply(status)
    reply.headers["x-should-retry"] = "true"
    return reply


def assert_usage(usage: Usage | None) -> None:
    assert usage == Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10, cached_tokens=4)
    assert usage.prompt_tokens_details.cached_tokens == 4


# ----------------------------------------------------------------------- happy paths


def test_completion(client: Client, fake: FakeGateway) -> None:
    out = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=8, temperature=0.0, seed=1, stop=None
    )
    assert out.text == TEXT
    assert out.choices[0].finish_reason == "stop"
    assert out.model == MODEL and out.object == "text_completion"
    assert_usage(out.usage)
    (seen,) = fake.seen
    assert seen.path == "/v1/completions"
    assert seen.body == {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 8,
        "temperature": 0.0,
        "seed": 1,
    }
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert out.request_id == seen.headers["x-request-id"]
    assert len(out.request_id) == 32  # uuid4 hex


def test_completion_stream(client: Client, fake: FakeGateway) -> None:
    with client.completions.create(
        model=MODEL, prompt="Hi", stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "stop"]
    assert chunks[-1].choices == [] and chunks[0].usage is None
    assert_usage(chunks[-1].usage)
    assert fake.seen[0].body["stream"] is True
    assert stream.request_id == fake.request_ids[0] == chunks[0].request_id


def test_chat_completion(client: Client, fake: FakeGateway) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.content == TEXT
    assert_usage(out.usage)
    assert fake.seen[0].path == "/v1/chat/completions"
    assert fake.seen[0].body["messages"] == MESSAGES


def test_chat_completion_stream(client: Client) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.content for c in chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)


def test_models_list(client: Client) -> None:
    models = client.models.list()
    assert [m.id for m in models] == [MODEL]
    assert models.data[0].owned_by == "breakwater"


def test_openai_style_base_url_and_caller_request_id(fake: FakeGateway) -> None:
    with Client(fake.url + "/v1/") as c:
        out = c.completions.create(model=MODEL, prompt="Hi", extra_headers={"X-Request-Id": "r1"})
    assert out.request_id == "r1" and fake.request_ids == ["r1"]
    assert "authorization" not in fake.seen[0].headers


def test_extra_body_and_extra_query_are_merged_not_sent_as_fields(
    client: Client, fake: FakeGateway
) -> None:
    """As in the openai SDK: `extra_body` goes into the JSON body over the other fields (a
    server drops an unknown `extra_body` field silently), `extra_query` into the URL."""
    client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=8,
        extra_body={"ignore_eos": True, "max_tokens": 3},
        extra_query={"api-version": "1"},
    )
    (seen,) = fake.seen
    assert seen.body == {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    assert seen.query == {"api-version": "1"}


def test_closing_a_stream_early_frees_the_connection(client: Client) -> None:
    with client.completions.create(model=MODEL, prompt="Hi", stream=True) as stream:
        assert next(stream).text == "Hello"
    assert stream.response.is_closed
    assert client.completions.create(model=MODEL, prompt="Hi").text == TEXT


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, ServiceUnavailableError),
    ],
)
def test_error_mapping(fake: FakeGateway, status: int, cls: type[APIError]) -> None:
    fake.script(
        error_reply(
            status, "nope", type="invalid_request_error", code="bad", param="n", retry_after=1.5
        )
    )
    with Client(fake.url, max_retries=0) as c, pytest.raises(cls) as info:
        c.completions.create(model=MODEL, prompt="Hi")
    err = info.value
    assert (err.status, err.message, err.type, err.code, err.param) == (
        status,
        "nope",
        "invalid_request_error",
        "bad",
        "n",
    )
    assert err.retry_after == 1.5
    assert err.request_id == fake.request_ids[0]
    assert "nope" in str(err) and err.request_id in str(err)


def test_error_without_openai_body(client: Client, fake: FakeGateway) -> None:
    fake.script(Reply(status=418, body={"detail": "teapot"}))
    with pytest.raises(APIError) as info:
        client.models.list()
    assert info.value.status == 418 and "teapot" in info.value.message


@pytest.fixture
def east_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 5 hours east of UTC: a date read as local time is 5 hours early."""
    monkeypatch.setenv("TZ", "BWT-5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("east_of_utc")
@pytest.mark.parametrize(
    "form", ["%a %b %d %H:%M:%S %Y", "%a, %d %b %Y %H:%M:%S -0000"], ids=["asctime", "-0000"]
)
def test_retry_after_dates_without_a_zone_are_gmt(form: str) -> None:
    when = time.strftime(form, time.gmtime(time.time() + 100))
    seconds = retry_after_seconds({"retry-after": when})
    assert seconds is not None and 90 < seconds <= 100


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_stream_error_event_is_raised(client: Client, fake: FakeGateway) -> None:
    fake.script(Reply(chunks=2, then="error"))
    texts = []
    with pytest.raises(StreamError) as info:
        for chunk in client.completions.create(model=MODEL, prompt="Hi", stream=True):
            texts.append(chunk.text)
    assert texts == ["Hello", ","]
    assert (info.value.message, info.value.type, info.value.code) == (
        "worker died",
        "server_error",
        503,
    )
    assert info.value.request_id == fake.request_ids[0]


def test_stream_answered_with_json_is_an_error_never_retried(
    client: Client, fake: FakeGateway
) -> None:
    """Read as a stream, a JSON answer would look cut short and be retried, the whole
    answer generated again each time."""
    fake.script(Reply(body={"object": "text_completion", "choices": []}))
    with pytest.raises(APIError, match="application/json") as info:
        client.completions.create(model=MODEL, prompt="Hi", stream=True)
    assert type(info.value) is APIError and info.value.status == 200
    assert info.value.body == {"object": "text_completion", "choices": []}
    assert len(fake.seen) == 1
    assert client.completions.create(model=MODEL, prompt="Hi").text == TEXT  # pool is fine


def test_truncated_stream_is_an_error(client: Client, fake: FakeGateway) -> None:
    fake.script(Reply(chunks=3, then="eof"))
    stream = client.completions.create(model=MODEL, prompt="Hi", stream=True)
    with pytest.raises(APIConnectionError, match=r"\[DONE\]"):
        list(stream)


# --------------------------------------------------------------------------- retries


def test_retry_429_honours_retry_after_and_keeps_request_id(
    client: Client, fake: FakeGateway
) -> None:
    fake.script(error_reply(429, retry_after=0.1), error_reply(429, retry_after_ms=100))
    start = time.monotonic()
    out = client.completions.create(model=MODEL, prompt="Hi")
    assert time.monotonic() - start >= 0.2  # both waits were taken (our own jitter is 0)
    assert out.text == TEXT
    assert len(fake.seen) == 3 and len(set(fake.request_ids)) == 1
    assert out.request_id == fake.request_ids[0]


def test_retries_are_capped_by_max_retries(client: Client, fake: FakeGateway) -> None:
    fake.script(*[error_reply(503, retry_after=0)] * 5)
    with pytest.raises(ServiceUnavailableError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert len(fake.seen) == 3  # 1 + max_retries


@pytest.mark.parametrize("status", [500, 502, 504])
def test_errors_the_server_vouches_for_are_retried(
    client: Client, fake: FakeGateway, status: int
) -> None:
    fake.script(vouched(status))
    assert client.completions.create(model=MODEL, prompt="Hi").text == TEXT
    assert len(fake.seen) == 2 and len(set(fake.request_ids)) == 1
    assert fake.seen[1].headers["x-retry-count"] == "1"


def test_server_errors_are_retried_only_if_the_server_says_so(
    client: Client, fake: FakeGateway
) -> None:
    refused = error_reply(503, retry_after=0)
    refused.headers["x-should-retry"] = "false"  # e.g. the gateway's retry budget is spent
    fake.script(refused, error_reply(500))
    with pytest.raises(ServiceUnavailableError):
        client.completions.create(model=MODEL, prompt="Hi")
    with pytest.raises(InternalServerError):
        client.completions.create(model=MODEL, prompt="Hi")
    assert len(fake.seen) == 2


def test_a_long_retry_after_gives_up_at_once_without_a_deadline(fake: FakeGateway) -> None:
    """Past `max_retry_after` (60 s by default) a Retry-After is not waited out, even with
    no deadline to stop it; the caller can read it off the error."""
    fake.script(error_reply(503, retry_after=1e300), error_reply(429, retry_after=86400))
    with Client(fake.url, timeout=None, retry_policy=fast_policy()) as c:
        for cls, asked in ((ServiceUnavailableError, 1e300), (RateLimitError, 86400)):
            start = time.monotonic()
            with pytest.raises(cls) as info:
                c.completions.create(model=MODEL, prompt="Hi")
            assert info.value.retry_after == asked and time.monotonic() - start < 10
    assert len(fake.seen) == 2


def test_client_errors_are_not_retried(client: Client, fake: FakeGateway) -> None:
    fake.script(error_reply(400))
    with pytest.raises(BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi")
    assert len(fake.seen) == 1


def test_connection_error_is_retried(client: Client, fake: FakeGateway) -> None:
    fake.script(Reply(drop=True))
    assert client.models.list().data[0].id == MODEL
    assert len(fake.seen) == 2 and len(set(fake.request_ids)) == 1


def test_stream_is_retried_before_its_first_chunk(client: Client, fake: FakeGateway) -> None:
    fake.script(error_reply(503, retry_after=0), Reply(chunks=0, then="drop"))
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert "".join(c.content for c in chunks) == TEXT
    assert len(fake.seen) == 3 and len(set(fake.request_ids)) == 1


@pytest.mark.parametrize(("then", "error"), [("drop", APIConnectionError), ("error", StreamError)])
def test_stream_is_never_retried_after_its_first_chunk(
    client: Client, fake: FakeGateway, then: str, error: type[APIError]
) -> None:
    fake.script(Reply(chunks=2, then=then))  # type: ignore[arg-type]
    stream = client.completions.create(model=MODEL, prompt="Hi", stream=True)
    assert next(stream).text == "Hello"
    with pytest.raises(error):
        list(stream)
    assert len(fake.seen) == 1  # a retry would have been answered by the canned success
    assert client.stats().retries == 0


# -------------------------------------------------------------------------- deadline


def test_deadline_stops_retries(fake: FakeGateway) -> None:
    fake.script(*[error_reply(503, retry_after=0.05)] * 100)
    with Client(fake.url, timeout=1.0, retry_policy=fast_policy(max_retries=100)) as c:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            c.completions.create(model=MODEL, prompt="Hi")
        assert time.monotonic() - start < 5
    assert 2 <= len(fake.seen) < 100


def test_retry_after_past_the_deadline_gives_up_at_once(client: Client, fake: FakeGateway) -> None:
    fake.script(error_reply(429, retry_after=60))
    start = time.monotonic()
    with pytest.raises(RateLimitError) as info:
        client.completions.create(model=MODEL, prompt="Hi", timeout=20)
    assert time.monotonic() - start < 10 and info.value.retry_after == 60
    assert len(fake.seen) == 1


def test_deadline_bounds_a_slow_answer(client: Client, fake: FakeGateway) -> None:
    fake.script(Reply(delay=5))
    start = time.monotonic()
    with pytest.raises(APITimeoutError):
        client.completions.create(model=MODEL, prompt="Hi", timeout=0.3)
    assert time.monotonic() - start < 4


def test_deadline_covers_the_whole_stream(client: Client, fake: FakeGateway) -> None:
    fake.script(Reply(gap=0.3))
    with pytest.raises(APITimeoutError):
        list(client.completions.create(model=MODEL, prompt="Hi", stream=True, timeout=0.5))
    assert len(fake.seen) == 1


# Past the deadline mid-body: httpx's read timeout applies to each read, so these would
# end one timeout after the late chunk (silent) or only when the server stops (trickle).
STALLS = [Reply(gap=0.5, chunks=1, stall=30), Reply(chunks=1, stall=30, trickle=0.2)]
STALL_IDS = ["silent-after-a-late-chunk", "unending-line"]
TRICKLE = Reply(trickle=0.3)  # a JSON body 8 bytes at a time: ~15 s


def watchdogs() -> int:
    return sum(t.name == "breakwater-deadline" for t in threading.enumerate())


@pytest.mark.parametrize("stall", STALLS, ids=STALL_IDS)
def test_deadline_bounds_a_stream_that_stalls(fake: FakeGateway, stall: Reply) -> None:
    fake.script(stall)
    with Client(fake.url, timeout=1.0, retry_policy=fast_policy()) as c:
        start = time.monotonic()
        with pytest.raises(APITimeoutError, match="deadline exceeded") as info:
            list(c.completions.create(model=MODEL, prompt="Hi", stream=True))
        assert time.monotonic() - start < 10
    assert info.value.request_id == fake.request_ids[0] and len(fake.seen) == 1


def test_deadline_bounds_a_trickling_body(fake: FakeGateway) -> None:
    fake.script(TRICKLE)
    with Client(fake.url, timeout=1.0, retry_policy=fast_policy()) as c:
        start = time.monotonic()
        with pytest.raises(APITimeoutError, match="deadline exceeded") as info:
            c.completions.create(model=MODEL, prompt="Hi")
        assert time.monotonic() - start < 10
        assert c.models.list().data[0].id == MODEL  # the pool lost only the bad connection
    assert info.value.request_id == fake.request_ids[0] and len(fake.seen) == 2


def test_the_deadline_watchdog_ends_with_the_body(client: Client, fake: FakeGateway) -> None:
    """The sync client's timer thread lives while a body is read and goes once it is read,
    fails or is closed: left to fire, it would shut down a connection back in the pool."""
    before = watchdogs()
    client.completions.create(model=MODEL, prompt="Hi")
    list(client.completions.create(model=MODEL, prompt="Hi", stream=True))
    with client.completions.create(model=MODEL, prompt="Hi", stream=True) as stream:
        next(stream)
        assert watchdogs() > before
    deadline = time.monotonic() + 10
    while watchdogs() > before:
        assert time.monotonic() < deadline, "a watchdog outlived its body"
        time.sleep(0.01)
    with (
        Client(fake.url, timeout=None) as c,
        c.completions.create(model=MODEL, prompt="Hi", stream=True) as stream,
    ):
        next(stream)
        assert watchdogs() <= before  # no deadline, no watchdog


# [DONE], then the body held open with keep-alive comments: the openai SDK returns at
# [DONE]; this one read on until the deadline, or without one, for as long as it lasted.
HOLD = Reply(hold=30)


def streamed(c: Client) -> str:
    return "".join(x.text for x in c.completions.create(model=MODEL, prompt="Hi", stream=True))


def test_a_stream_ends_at_done_though_its_body_stays_open(fake: FakeGateway) -> None:
    with Client(fake.url, timeout=None, retry_policy=fast_policy()) as c:
        for _ in range(2):  # an ordinary stream's connection goes back to the pool
            assert streamed(c) == TEXT
        assert fake.seen[0].peer_port == fake.seen[1].peer_port
        fake.script(HOLD)
        start = time.monotonic()
        chunks = list(c.completions.create(model=MODEL, prompt="Hi", stream=True))
        assert "".join(x.text for x in chunks) == TEXT
        assert time.monotonic() - start < 15  # the 1 s grace after [DONE], not 30 s
        assert c.completions.create(model=MODEL, prompt="Hi").text == TEXT


def test_a_deadline_does_not_fail_a_stream_that_said_done(fake: FakeGateway) -> None:
    fake.script(HOLD)
    with Client(fake.url, timeout=0.5, retry_policy=fast_policy()) as c:
        assert streamed(c) == TEXT


def test_tool_calls_refusals_and_reasoning_are_kept() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
    reply = ChatCompletion.from_dict(
        {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    )
    assert reply.choices[0].message.tool_calls == [call]
    assert reply.choices[0].finish_reason == "tool_calls"
    piece = {"index": 0, "function": {"arguments": '{"a"'}}
    delta = {"tool_calls": [piece], "reasoning_content": "hm", "refusal": "no"}
    chunk = ChatCompletionChunk.from_dict({"choices": [{"index": 0, "delta": delta}]})
    got = chunk.choices[0].delta
    assert (got.tool_calls, got.reasoning_content, got.refusal) == ([piece], "hm", "no")
    assert (
        ChatCompletion.from_dict({"choices": [{"message": {"tool_calls": 3}}]})
        .choices[0]
        .message.tool_calls
        is None
    )


# ------------------------------------------------------------------------------ async


@pytest.mark.anyio
async def test_async_completion_and_models(aclient: AsyncClient, fake: FakeGateway) -> None:
    out = await aclient.completions.create(model=MODEL, prompt="Hi", max_tokens=8)
    assert out.text == TEXT
    assert_usage(out.usage)
    assert out.request_id == fake.request_ids[0]
    assert [m.id for m in await aclient.models.list()] == [MODEL]


@pytest.mark.anyio
async def test_async_completion_stream(aclient: AsyncClient) -> None:
    stream = await aclient.completions.create(
        model=MODEL, prompt="Hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.text for c in chunks) == TEXT
    assert_usage(chunks[-1].usage)


@pytest.mark.anyio
async def test_async_chat(aclient: AsyncClient) -> None:
    out = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert out.content == TEXT
    assert_usage(out.usage)
    async with await aclient.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True
    ) as stream:
        chunks = [c async for c in stream]
    assert "".join(c.content for c in chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.anyio
async def test_async_retry_429_keeps_request_id(aclient: AsyncClient, fake: FakeGateway) -> None:
    fake.script(error_reply(429, retry_after=0.05), error_reply(503, retry_after=0.05))
    start = time.monotonic()
    out = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert time.monotonic() - start >= 0.1
    assert out.content == TEXT
    assert len(fake.seen) == 3 and len(set(fake.request_ids)) == 1


@pytest.mark.anyio
async def test_async_errors_and_no_retry_after_first_chunk(
    aclient: AsyncClient, fake: FakeGateway
) -> None:
    fake.script(error_reply(404, "no such model", type="invalid_request_error"))
    with pytest.raises(NotFoundError, match="no such model"):
        await aclient.completions.create(model="nope", prompt="Hi")
    fake.script(Reply(chunks=2, then="drop"))
    stream = await aclient.completions.create(model=MODEL, prompt="Hi", stream=True)
    with pytest.raises(APIConnectionError):
        async for _ in stream:
            pass
    assert len(fake.seen) == 2


@pytest.mark.anyio
async def test_async_deadline_stops_retries(fake: FakeGateway) -> None:
    fake.script(*[error_reply(503, retry_after=0.05)] * 100)
    async with AsyncClient(fake.url, timeout=1.0, retry_policy=fast_policy(100)) as c:
        with pytest.raises(ServiceUnavailableError):
            await c.completions.create(model=MODEL, prompt="Hi")
    assert 2 <= len(fake.seen) < 100


@pytest.mark.anyio
@pytest.mark.parametrize("stall", STALLS, ids=STALL_IDS)
async def test_async_deadline_bounds_a_stream_that_stalls(fake: FakeGateway, stall: Reply) -> None:
    fake.script(stall)
    async with AsyncClient(fake.url, timeout=1.0, retry_policy=fast_policy()) as c:
        start = time.monotonic()
        with pytest.raises(APITimeoutError, match="deadline exceeded") as info:
            async with asyncio.timeout(20):  # without the fix, the unending line: 30 s
                stream = await c.completions.create(model=MODEL, prompt="Hi", stream=True)
                async for _ in stream:
                    pass
        assert time.monotonic() - start < 10
    assert info.value.request_id == fake.request_ids[0] and len(fake.seen) == 1


@pytest.mark.anyio
async def test_async_deadline_bounds_a_trickling_body(fake: FakeGateway) -> None:
    fake.script(TRICKLE)
    async with AsyncClient(fake.url, timeout=1.0, retry_policy=fast_policy()) as c:
        start = time.monotonic()
        with pytest.raises(APITimeoutError, match="deadline exceeded") as info:
            await c.completions.create(model=MODEL, prompt="Hi")
        assert time.monotonic() - start < 10
        assert (await c.models.list()).data[0].id == MODEL
    assert info.value.request_id == fake.request_ids[0] and len(fake.seen) == 2


@pytest.mark.anyio
async def test_async_retry_after_bound_and_vouched_retry(fake: FakeGateway) -> None:
    fake.script(vouched(502), error_reply(429, retry_after=0.1), error_reply(429, retry_after=100))
    knobs = RetryPolicy(max_retries=5, max_retry_after=1.0, throttle_k=None)
    async with AsyncClient(fake.url, timeout=None, retry_policy=knobs) as c:
        with pytest.raises(RateLimitError) as info:
            async with asyncio.timeout(20):  # without the bound: a 100 s wait
                await c.completions.create(model=MODEL, prompt="Hi")
    assert info.value.retry_after == 100 and len(fake.seen) == 3


@pytest.mark.anyio
async def test_async_stream_extra_body_and_json_answer(
    aclient: AsyncClient, fake: FakeGateway
) -> None:
    fake.script(Reply(body={"error": None, "choices": []}))
    with pytest.raises(APIError, match="application/json"):
        await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert len(fake.seen) == 1
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join([c.content async for c in stream]) == TEXT
    assert fake.seen[1].body["ignore_eos"] is True and "extra_body" not in fake.seen[1].body
    assert fake.seen[1].body["stream"] is True


# ---------------------------------------------------------------------------- weight


def test_sdk_import_stays_light() -> None:
    code = (
        "import sys, breakwater.client; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'aiohttp')]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.anyio
async def test_async_stream_ends_at_done_though_its_body_stays_open(fake: FakeGateway) -> None:
    async with AsyncClient(fake.url, timeout=None, retry_policy=fast_policy()) as c:
        for _ in range(2):
            stream = await c.completions.create(model=MODEL, prompt="Hi", stream=True)
            assert "".join([x.text async for x in stream]) == TEXT
        assert fake.seen[0].peer_port == fake.seen[1].peer_port
        fake.script(HOLD)
        start = time.monotonic()
        stream = await c.completions.create(model=MODEL, prompt="Hi", stream=True)
        assert "".join([x.text async for x in stream]) == TEXT
        assert time.monotonic() - start < 15


@pytest.mark.anyio
async def test_async_deadline_covers_a_response_head_that_trickles() -> None:
    """httpx's read timeout applies to each read: a head sent a line every 0.1 s held the
    call for as long as it went on (here 30 s)."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(OSError):
            for i in range(300):
                await asyncio.sleep(0.1)
                writer.write(f"X-Pad-{i}: x\r\n".encode())
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncClient(f"http://127.0.0.1:{port}", timeout=1.0) as c:
            start = time.monotonic()
            with pytest.raises(APITimeoutError, match="deadline exceeded"):
                await c.completions.create(model=MODEL, prompt="Hi")
            assert time.monotonic() - start < 10
    finally:
        server.close()
