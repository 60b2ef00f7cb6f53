"""The admission facade the HTTP and gRPC front ends call before routing a request.

Order of checks, cheapest and least wasteful first, each refusal immediate:

1. tenant from the API key (401);
2. deadline already passed (504), global queue already full (503);
3. the tenant's concurrency (429), so one tenant cannot fill the queue;
4. token buckets, tenant and global, in requests and LLM tokens, all or nothing (429), in
   Redis when configured and reachable, else local;
5. the global concurrency limit, waiting in the priority queue if need be (503/504).

Only then is a slot held; the returned :class:`Ticket` frees it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from gateway.admission.buckets import BucketSpec, LocalBuckets, retry_after_ms
from gateway.admission.queue import PriorityLimiter, deadline_exceeded, overloaded
from gateway.admission.redis_buckets import RedisBuckets
from gateway.admission.tenants import (
    DEFAULT_TENANT,
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    AdmissionSettings,
    Quota,
    Rates,
    Tenant,
    TenantDirectory,
    load_settings,
    per_process,
    quota_from_fields,
    quota_share,
)
from gateway.resilience.retry_budget import RetryBudget
from proto import inference_pb2 as pb
from proto.openai_compat import OpenAIError

AUTO_INITIAL_IN_FLIGHT = 256
"""The in-flight limit of an adaptive gateway until it has seen its fleet."""


def estimate_tokens(prompt: str | Sequence[int], max_tokens: int) -> int:
    """LLM tokens to charge before tokenizing: prompt estimate + ``max_tokens``.

    About 4 UTF-8 bytes per token: close for English and code, and it over- rather than
    under-charges most other scripts (a CJK character is 3 bytes and about 1 token).
    """
    n = len(prompt) if not isinstance(prompt, str) else math.ceil(len(prompt.encode()) / 4)
    return n + max(0, max_tokens)


def estimate_request_tokens(request: pb.GenerateRequest) -> int:
    """`estimate_tokens` for a Generate request (chat, token ids or text; max_tokens 256
    when unset), as both front ends charge it."""
    sp = request.sampling
    return estimate_prompt_tokens(request) + (sp.max_tokens if sp.HasField("max_tokens") else 256)


def estimate_prompt_tokens(request: pb.GenerateRequest) -> int:
    """The prompt's part of `estimate_request_tokens`."""
    which = request.WhichOneof("prompt")
    prompt: str | list[int]
    if which == "chat":
        prompt = "".join(m.content for m in request.chat.messages)
    elif which == "token_ids":
        prompt = list(request.token_ids.ids)
    else:
        prompt = request.text
    return estimate_tokens(prompt, 0)


@dataclass(frozen=True, slots=True)
class Charge:
    """What admission took from the buckets, and where (Redis, or this process's)."""

    specs: tuple[BucketSpec, ...]
    shared: bool
    """Taken from the Redis buckets (else the local ones)."""

    def tokens(self) -> tuple[BucketSpec, ...]:
        return tuple(s for s in self.specs if s.key.endswith(":tokens"))


class Ticket:
    """An admitted request's slot: ``async with ticket:`` or call :meth:`release` once done."""

    __slots__ = (
        "_admission",
        "_charged",
        "_granted",
        "_released",
        "cache_salt",
        "key_id",
        "priority",
        "queued_s",
        "tenant",
    )

    def __init__(
        self,
        admission: Admission,
        tenant: str,
        priority: int,
        queued_s: float,
        key_id: str | None = None,
        charged: Charge | None = None,
        cache_salt: str = "",
    ) -> None:
        self._admission = admission
        self.cache_salt = cache_salt
        """The tenant's own prefix-cache salt when it isolates its cache, else ''."""
        self._charged = charged
        """The token buckets charged the estimate, settled at release with the real use."""
        self.tenant = tenant
        self.key_id = key_id
        """The id of the API key the request came with (None: no key, or a digest-only one)."""
        self.priority = priority
        self.queued_s = queued_s
        """Seconds spent waiting in the admission queue."""
        self._granted = time.monotonic()
        self._released = False

    def release(self, used_tokens: int | None = None) -> None:
        """Free the slot; idempotent, so a ``finally`` and ``async with`` may both call it.

        ``used_tokens``: what the request really took (prompt + completion, from its
        usage), charged to the token buckets in place of the estimate. The estimate counts
        256 for an unset max_tokens, where a worker generates up to the context: without
        settling, leaving max_tokens out ran a tenant at 20x its token rate.
        """
        if not self._released:
            self._released = True
            self._admission._release(self.tenant, time.monotonic() - self._granted)
            if used_tokens is not None and self._charged is not None:
                self._admission._settle(self._charged, used_tokens)

    @property
    def released(self) -> bool:
        return self._released

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Tenants, quotas and the global queue behind one call, :meth:`admit`.

    ``config``: settings, a config file path (TOML or ``.json``), or ``None`` for defaults
    (no keys, no rate limits, the default queue bounds). ``redis_url`` overrides the file's.
    """

    def __init__(
        self,
        config: AdmissionSettings | str | os.PathLike[str] | None = None,
        *,
        redis_url: str | None = None,
        processes: int = 1,
        index: int = 0,
    ) -> None:
        settings = config if isinstance(config, AdmissionSettings) else load_settings(config)
        self.configured = settings
        """As configured, for the whole gateway (before this process's share is taken)."""
        self.processes = processes
        self.index = index
        """This process's place among them: which of a limit's uneven parts it takes."""
        settings = per_process(settings, processes, index)
        self.settings = settings
        self.tenants = TenantDirectory(settings)
        g = settings.global_limits
        self.adaptive = g.max_in_flight is None
        """The in-flight limit follows the fleet (`follow_fleet`), not the config."""
        self.limiter = PriorityLimiter(
            g.max_in_flight or AUTO_INITIAL_IN_FLIGHT, g.max_queue, g.max_queue_wait_s
        )
        self.local = LocalBuckets()
        url = redis_url or settings.redis_url
        self.redis: RedisBuckets | None = None
        if url:
            self.redis = RedisBuckets(
                url,
                prefix=settings.redis_prefix,
                socket_timeout=settings.redis_socket_timeout_s,
                op_timeout=settings.redis_op_timeout_s,
                backoff_s=settings.redis_probe_interval_s,
            )
        self._fallback_scale = settings.fallback_share if url else 1.0
        self._burst_share = 1 if url or processes <= 1 else processes
        """What this process's bucket sizes were divided by (per_process)."""
        self._active: dict[str, int] = {}
        self._quotas: dict[str, Quota] = {}
        self._admin_quotas: dict[str, Quota] = {}
        """Tenant -> quota set at run time (admin API), this process's share."""
        self._tenant_hold: dict[str, float] = {}
        """Seconds a tenant's request holds its slot, on average (EWMA, 0.2): the Retry-After
        of its concurrency 429. Tenants are the config's, so it stays small."""
        self._adjusting: set[asyncio.Task[None]] = set()
        """Settlements and refunds on their way to Redis (a reference keeps each alive)."""
        self.door = RetryBudget(ratio=0.2, floor=10, window_s=10.0)
        """Retries arriving at the gateway, against new requests (see `admit`)."""
        self.counts: Counter[str] = Counter()
        """Outcomes: ``admitted`` and one key per refusal reason, for metrics."""
        self.retry_advice: Counter[str] = Counter()
        """Retries that arrived, and refusals told to retry or not: a family of its own,
        counted beside (not among) the outcomes, which counted each refusal twice."""

    async def start(self) -> None:
        if self.redis is not None:
            await self.redis.start()

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

    async def admit(
        self,
        authorization: str | None,
        est_tokens: int,
        priority: int | None,
        deadline: float,
        retry: bool = False,
    ) -> Ticket:
        """Admit a request or raise ``OpenAIError`` (401, 400, 429, 503, 504) at once.

        ``retry``: the client says this is a retry (`X-Retry-Count`, the openai SDK's
        `x-stainless-retry-count`); only new requests earn retry budget. Retries at the door
        are held to 20% of new requests over 10 s: a refusal says `x-should-retry: true`
        only while that lasts, else `false`, which the openai SDK and ours obey, so an
        overloaded gateway is not retried into a storm.
        """
        if retry:
            self.retry_advice["retry_arrived"] += 1
        else:
            self.door.on_request()
        try:
            return await self._admit(authorization, est_tokens, priority, deadline)
        except OpenAIError as e:
            self.judge_retry(e)
            raise

    def judge_retry(self, e: OpenAIError) -> None:
        """Tell the client of a retryable refusal whether to retry: yes while the door's
        retry budget lasts, and each yes spends from it then (counting retries when they
        arrive let a burst of refusals all hear yes before the first retry came back)."""
        if e.type == "rate_limit_error":
            # A quota's refusal (a tenant's or the gateway's bucket, a tenant's concurrency)
            # is not the door's: its Retry-After is exact and its bucket bounds the retries.
            # Spending the shared budget on it let one tenant's flood tell every other
            # tenant's clients not to retry.
            return
        if e.should_retry is None and e.status in (429, 500, 502, 503, 504):
            e.should_retry = self.door.try_spend()
            self.retry_advice["told_to_retry" if e.should_retry else "told_not_to_retry"] += 1

    async def _admit(
        self, authorization: str | None, est_tokens: int, priority: int | None, deadline: float
    ) -> Ticket:
        """`admit` without the door's retry accounting.

        ``authorization``: the ``Authorization`` header (or gRPC metadata) value.
        ``est_tokens``: prompt estimate + max_tokens (see :func:`estimate_tokens`).
        ``priority``: 0 interactive, 1 batch, ``None`` for the tenant's default.
        ``deadline``: a ``time.monotonic()`` instant (``math.inf`` for none); a request
        still queued then is dropped with 504.
        """
        try:
            tenant, key_id = self.tenants.identify(authorization)
        except OpenAIError:
            self.counts["unauthorized"] += 1
            raise
        try:
            return await self._admit_tenant(tenant, key_id, est_tokens, priority, deadline)
        except OpenAIError as e:  # whose refusal it is, for the request log
            e.tenant, e.key_id = tenant.name, key_id
            raise

    async def _admit_tenant(
        self,
        tenant: Tenant,
        key_id: str | None,
        est_tokens: int,
        priority: int | None,
        deadline: float,
    ) -> Ticket:
        quota = self._quotas.get(tenant.name, tenant.quota)
        prio = quota.priority if priority is None else priority
        if prio not in (PRIORITY_INTERACTIVE, PRIORITY_BATCH):
            raise OpenAIError(
                400, "'priority' must be 0 (interactive) or 1 (batch)", param="priority"
            )
        if not deadline > time.monotonic():  # also refuses NaN
            self.counts["deadline"] += 1
            raise deadline_exceeded("The request's deadline passed before it was admitted.")
        if self.limiter.full:
            self.counts["overloaded"] += 1
            self.limiter.rejected_full += 1
            raise overloaded(
                f"The gateway is overloaded: {self.limiter.in_flight} requests in flight and "
                f"{self.limiter.queued} queued. Retry later.",
                self.limiter.retry_after_s(),
            )
        active = self._active.get(tenant.name, 0)
        if quota.max_concurrent is not None and active >= quota.max_concurrent:
            self.counts["tenant_concurrency"] += 1
            # until one of its own requests ends: its own mean hold, not the gateway's
            # (others' short calls said 240 ms while a 3 s stream held the only slot)
            hold = self._tenant_hold.get(tenant.name, self.limiter.mean_hold_s)
            wait = hold / quota.max_concurrent
            raise OpenAIError(
                429,
                f"Tenant '{tenant.name}' already has {active} requests in progress, its limit. "
                "Retry when one finishes.",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after_ms=retry_after_ms(min(30.0, max(0.05, wait))),
            )
        specs = self._specs(tenant.name, quota, max(0, int(est_tokens)))
        self._active[tenant.name] = active + 1
        charge: Charge | None = None
        try:
            if specs:
                charge = await self._charge(tenant, specs)
            queued_s = await self.limiter.acquire(prio, deadline)
        except BaseException as exc:
            self._drop_active(tenant.name)
            if isinstance(exc, OpenAIError) and exc.status in (503, 504):
                self.counts["overloaded" if exc.status == 503 else "deadline"] += 1
            elif isinstance(exc, asyncio.CancelledError):
                # the client left while queued (or its charge was in Redis): in no other
                # outcome, a queue's waits given up on were invisible in the metric
                self.counts["cancelled"] += 1
            if charge is not None:
                # never served (the queue was full, or its deadline passed in it): its
                # quota back, which it spent before, and a tenant never served got 429s
                self._adjust(charge, [replace(s, cost=-s.cost) for s in charge.specs])
            raise
        self.counts["admitted"] += 1
        tokens = charge.tokens() if charge is not None else ()
        settle = Charge(tokens, charge.shared) if charge is not None and tokens else None
        salt = self.tenants.cache_salt(tenant.name) if quota.isolate_cache else ""
        return Ticket(self, tenant.name, prio, queued_s, key_id, settle, salt)

    @staticmethod
    def salt(request: pb.GenerateRequest, ticket: Ticket | None) -> None:
        """Put an isolating tenant's salt before the request's own `cache_salt` (the client
        keeps its own partitions within the tenant's, and cannot leave the tenant's). The
        client's part goes as a digest: the whole stays within what a worker takes."""
        if ticket is not None and ticket.cache_salt:
            own = request.cache_salt
            if own:
                digest = hashlib.blake2b(own.encode(), digest_size=16).hexdigest()
                request.cache_salt = f"{ticket.cache_salt}:{digest}"
            else:
                request.cache_salt = ticket.cache_salt

    def _settle(self, charge: Charge, used_tokens: int) -> None:
        """Charge the token buckets the difference between the real use and the estimate."""
        delta = max(0, used_tokens) - charge.specs[0].cost
        if abs(delta) >= 1:
            self._adjust(charge, [replace(s, cost=delta) for s in charge.specs])

    def _adjust(self, charge: Charge, specs: list[BucketSpec]) -> None:
        """Adjust buckets where the charge was taken; Redis's in the background (a
        request's end must not wait on it), this process's at once."""
        if charge.shared and self.redis is not None:
            task = asyncio.get_running_loop().create_task(self._adjust_shared(specs))
            self._adjusting.add(task)
            task.add_done_callback(self._adjusting.discard)
        else:
            self.local.adjust(specs, self._fallback_scale)

    async def _adjust_shared(self, specs: list[BucketSpec]) -> None:
        assert self.redis is not None
        if not await self.redis.adjust(specs):
            self.local.adjust(specs, self._fallback_scale)  # Redis down: the local stand-in

    def _specs(self, name: str, quota: Quota, tokens: int) -> list[BucketSpec]:
        specs: list[BucketSpec] = []
        scopes: tuple[tuple[str, Rates], ...] = (
            (f"tenant:{name}", quota),
            ("global", self.settings.global_limits),
        )
        for scope, rates in scopes:
            if (b := rates.request_bucket()) is not None:
                specs.append(BucketSpec(f"{scope}:requests", b[0], b[1], 1.0))
            if tokens and (b := rates.token_bucket()) is not None:
                # against the burst as configured: a process's share of it (no Redis) pays
                # a larger cost when full, in debt (LocalBuckets.take); refusing with a 400
                # made a request's validity depend on the number of cores
                if tokens > b[1] * self._burst_share:
                    self.counts["too_large"] += 1
                    who = "the gateway" if scope == "global" else f"tenant '{name}'"
                    raise OpenAIError(
                        400,
                        f"Request too large: it needs about {tokens} tokens (prompt + "
                        f"max_tokens) but the token burst of {who} is "
                        f"{b[1] * self._burst_share:g}. "
                        "Lower max_tokens or shorten the prompt.",
                        type_="invalid_request_error",
                        param="max_tokens",
                        code="request_too_large",
                    )
                specs.append(BucketSpec(f"{scope}:tokens", b[0], b[1], float(tokens)))
        return specs

    async def _charge(self, tenant: Tenant, specs: list[BucketSpec]) -> Charge:
        result = await self._shared_take(specs) if self.redis is not None else None
        shared = result is not None
        if result is None:
            result = self.local.take(specs, self._fallback_scale)
        if result.allowed:
            return Charge(tuple(specs), shared)
        self.counts["rate_limited"] += 1
        spec = specs[result.limiting]
        scope, kind = spec.key.rsplit(":", 1)
        who = "the gateway" if scope == "global" else f"tenant '{tenant.name}'"
        ms = retry_after_ms(result.wait_s)
        raise OpenAIError(
            429,
            f"Rate limit reached for {who} on {kind}: limit {spec.rate:g} per second, burst "
            f"{spec.burst:g}; this request needs {spec.cost:g}. Retry after {ms} ms.",
            type_="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after_ms=ms,
        )

    async def _shared_take(self, specs: list[BucketSpec]) -> Any:
        """Redis's take, given back if the request is cancelled while it runs: its script
        charges the buckets whether or not anyone waits for the answer (a client that left
        there spent its tenant's quota on nothing)."""
        assert self.redis is not None
        take = asyncio.ensure_future(self.redis.take(specs))
        try:
            return await asyncio.shield(take)
        except asyncio.CancelledError:
            take.add_done_callback(lambda t: self._give_back(t, specs))
            raise

    def _give_back(self, take: asyncio.Future[Any], specs: list[BucketSpec]) -> None:
        if take.cancelled() or take.exception() is not None:
            return
        result = take.result()
        if result is not None and result.allowed:
            self._adjust(Charge(tuple(specs), True), [replace(s, cost=-s.cost) for s in specs])

    def _drop_active(self, name: str) -> None:
        n = self._active.get(name, 0) - 1
        if n > 0:
            self._active[name] = n
        else:
            self._active.pop(name, None)

    def _release(self, tenant: str, hold_s: float) -> None:
        self._drop_active(tenant)
        self.limiter.release(hold_s)
        last = self._tenant_hold.get(tenant)
        self._tenant_hold[tenant] = hold_s if last is None else 0.8 * last + 0.2 * hold_s

    def follow_fleet(self, total_in_flight: int, wait_budgets: dict[int, float]) -> None:
        """The fleet's adaptive figures (see adaptive.py): this process's share of what the
        ready replicas take at once, and how long each priority may wait for a slot."""
        if self.adaptive:
            share = math.ceil(max(1, total_in_flight) / self.processes)
            self.limiter.set_max_in_flight(share)
        self.limiter.wait_budgets = wait_budgets

    def tenant_quotas(self) -> dict[str, Quota]:
        """Every tenant's quota for the whole gateway: the config's, or the admin's."""
        c = self.configured
        tenants = {t.name: t.quota for t in c.tenants} or {DEFAULT_TENANT: c.defaults}
        return tenants | self._admin_quotas

    def set_quotas(self, entries: Mapping[str, Any]) -> None:
        """Quotas set at run time (tenant -> quota fields over the configured quota); an
        entry that names no tenant or does not parse is skipped (the admin API checked it)."""
        base = {t.name: t.quota for t in self.configured.tenants} or {
            DEFAULT_TENANT: self.configured.defaults
        }
        admin: dict[str, Quota] = {}
        for name, data in entries.items():
            if name in base:
                try:
                    admin[name] = quota_from_fields(data, base[name], f"quota of {name}")
                except ValueError:
                    continue
        shared = self.redis is not None
        self._admin_quotas = admin
        self._quotas = {
            n: quota_share(q, self.processes, shared, self.index) for n, q in admin.items()
        }

    def active(self, tenant: str) -> int:
        """Admitted or queued requests of ``tenant`` now."""
        return self._active.get(tenant, 0)

    def stats(self) -> dict[str, Any]:
        """A snapshot for an admin endpoint or metrics."""
        return {
            "in_flight": self.limiter.in_flight,
            "queued": self.limiter.queued,
            "max_in_flight": self.limiter.max_in_flight,
            "max_queue": self.limiter.max_queue,
            "mean_hold_s": round(self.limiter.mean_hold_s, 4),
            "redis": None
            if self.redis is None
            else {"available": self.redis.available, "failures": self.redis.failures},
            "active_by_tenant": dict(self._active),
            "counts": dict(self.counts),
        }
