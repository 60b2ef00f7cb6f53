"""Open-loop streaming traffic for the chaos scenarios: Poisson arrivals, one record each.

Open loop on purpose: arrivals do not wait for answers, as real users do not, so a slow or
failing fleet shows up as latency and errors rather than as a politely reduced load.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import aiohttp


@dataclass
class Target:
    url: str
    model: str


@dataclass
class Record:
    start_s: float
    """Offset from the start of the run."""
    status: str = "ok"
    """'ok', an HTTP status ('429', '503'), 'error-event' or 'connection'."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    attempts: int = 1
    worker: str = ""
    aborted_after_first_token: bool = False
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def poisson_schedule(rate: float, duration: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


async def _one(
    session: aiohttp.ClientSession,
    target: Target,
    max_tokens: int,
    start: float,
    t0: float,
    timeout: float,
) -> Record:
    rec = Record(start_s=start)
    body = {
        "model": target.model,
        "prompt": f"request at {start:.3f}",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    began = time.monotonic()
    try:
        async with session.post(
            target.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            rec.attempts = int(resp.headers.get("x-breakwater-attempts", "1") or 1)
            rec.worker = resp.headers.get("x-breakwater-worker", "")
            if resp.status != 200:
                rec.status = str(resp.status)
                rec.retry_after = resp.headers.get("Retry-After")
                await resp.read()
                return rec
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    rec.status = "error-event"
                    break
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    rec.tokens += 1
                    if rec.ttft_s is None:
                        rec.ttft_s = time.monotonic() - began
    except (aiohttp.ClientError, TimeoutError):
        rec.status = "connection"
    finally:
        rec.e2e_s = time.monotonic() - began
    if not rec.ok and rec.ttft_s is not None:
        rec.aborted_after_first_token = True
    return rec


async def run_open_loop(
    target: Target,
    schedule: list[float],
    max_tokens: int = 48,
    duration_s: float = 60.0,
    max_requests: int = 10_000,
    timeout: float = 60.0,
) -> list[Record]:
    """Send one request at each scheduled offset; wait for all; bounded in count and time."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for start in schedule[:max_requests]:
            if start > duration_s:
                break
            await asyncio.sleep(max(0.0, t0 + start - loop.time()))
            tasks.append(asyncio.create_task(_one(session, target, max_tokens, start, t0, timeout)))
        return list(await asyncio.gather(*tasks))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(records: list[Record]) -> dict[str, dict[str, float]]:
    ttft = [r.ttft_s * 1000 for r in records if r.ok and r.ttft_s is not None]
    e2e = [r.e2e_s * 1000 for r in records if r.ok and r.e2e_s is not None]
    return {
        name: {f"p{int(q * 100)}": round(_pct(v, q), 2) for q in (0.5, 0.9, 0.99)}
        for name, v in (("ttft_ms", ttft), ("e2e_ms", e2e))
    }
