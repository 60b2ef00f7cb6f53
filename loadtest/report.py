"""Load-test records into figures: percentiles, throughput, goodput, errors; table, JSON, PNG.

Percentiles are nearest-rank (the smallest value with at least q% of values at or below
it): always a value that was measured, exact on small samples, no interpolation to argue
about. Latency percentiles cover successful requests; rejects (429/503, gRPC
RESOURCE_EXHAUSTED/UNAVAILABLE before any token) have their own figure, because a fast
"no" must neither flatter nor hide the latency of the requests that were served.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.records import RequestRecord

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """A request counts toward goodput if it succeeded within both bounds."""

    ttft_ms: float = 1000.0
    e2e_ms: float = 10_000.0

    def met(self, r: RequestRecord) -> bool:
        return (
            r.ok
            and r.ttft_s is not None
            and r.e2e_s is not None
            and r.ttft_s * 1000 <= self.ttft_ms
            and r.e2e_s * 1000 <= self.e2e_ms
        )


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank q-th percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    rank = math.ceil(q * len(s) / 100 - 1e-9)
    return s[min(len(s), max(1, rank)) - 1]


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in QUANTILES:
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v, 3)
    return out


def error_key(r: RequestRecord) -> str:
    """`status` or `status:code`: '429:rate_limit_exceeded', 'stream-error:upstream_error'."""
    return f"{r.status}:{r.error_code}" if r.error_code else r.status


def summarize(
    records: Sequence[RequestRecord], slo: SLO | None = None, duration_s: float | None = None
) -> dict[str, Any]:
    """One JSON-ready object. Rates divide by the window from the first send to the last
    answer, at least `duration_s` (the schedule's length) when given, so a server that falls
    behind shows a lower throughput, not a flattering one; `offered_rps` is requests sent per
    `duration_s` (else per window). So goodput <= throughput <= offered."""
    slo = slo or SLO()
    n = len(records)
    ok = [r for r in records if r.ok]
    good = [r for r in records if slo.met(r)]
    rejects = [r for r in records if r.rejected]
    span = (max(r.end_s for r in records) - min(r.start_s for r in records)) if records else 0.0
    window = max(duration_s or 0.0, span)

    def rate(x: float, over: float) -> float | None:
        return round(x / over, 3) if over > 0 else None

    tokens = sum(r.output_tokens for r in ok)
    attempts = [r.attempts for r in records]
    return {
        "requests": n,
        "ok": len(ok),
        "failed": n - len(ok),
        "rejected": len(rejects),
        "aborted_after_first_token": sum(r.aborted_after_first_token for r in records),
        "duration_s": round(window, 3),
        "offered_rps": rate(n, duration_s or span),
        "throughput_rps": rate(len(ok), window),
        "output_tok_s": rate(tokens, window),
        "goodput_rps": rate(len(good), window),
        "goodput_ratio": round(len(good) / n, 4) if n else None,
        "slo": {"ttft_ms": slo.ttft_ms, "e2e_ms": slo.e2e_ms},
        "ttft_ms": _dist([r.ttft_s * 1000 for r in ok if r.ttft_s is not None]),
        "tpot_ms": _dist([r.tpot_s * 1000 for r in ok if r.tpot_s is not None]),
        "e2e_ms": _dist([r.e2e_s * 1000 for r in ok if r.e2e_s is not None]),
        "reject_ms": _dist([r.e2e_s * 1000 for r in rejects if r.e2e_s is not None]),
        "retry_after_s": _dist([r.retry_after_s for r in rejects if r.retry_after_s is not None]),
        "errors": dict(sorted(Counter(error_key(r) for r in records if not r.ok).items())),
        "attempts": {
            "total": sum(attempts),
            "mean": round(sum(attempts) / n, 3) if n else None,
            "max": max(attempts, default=0),
        },
        "send_lateness_ms": _dist([r.lateness_s * 1000 for r in records]),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"
    return str(v)


def format_table(s: Mapping[str, Any]) -> str:
    """The summary as a few aligned lines for a terminal."""
    slo = s["slo"]
    lines = [
        f"requests {s['requests']}  ok {s['ok']}  failed {s['failed']}  rejected {s['rejected']}"
        f"  aborted after first token {s['aborted_after_first_token']}",
        f"offered {_fmt(s['offered_rps'])} req/s  throughput {_fmt(s['throughput_rps'])} req/s"
        f"  {_fmt(s['output_tok_s'])} tok/s  over {_fmt(s['duration_s'])} s",
        f"goodput {_fmt(s['goodput_rps'])} req/s ({_fmt((s['goodput_ratio'] or 0) * 100)}% of "
        f"requests; SLO ttft <= {slo['ttft_ms']:g} ms, e2e <= {slo['e2e_ms']:g} ms)",
        f"{'':<18}" + "".join(f"{f'p{q}':>10}" for q in QUANTILES),
    ]
    for name in ("ttft_ms", "tpot_ms", "e2e_ms", "reject_ms", "send_lateness_ms"):
        row = s[name]
        lines.append(f"{name:<18}" + "".join(f"{_fmt(row.get(f'p{q}')):>10}" for q in QUANTILES))
    lines.append(
        f"attempts mean {_fmt(s['attempts']['mean'])} max {s['attempts']['max']}   errors "
        + (", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none")
    )
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, safe in CI and worker threads
    import matplotlib.pyplot as plt

    return plt


def plot_latency(records: Sequence[RequestRecord], path: str | Path, title: str = "") -> None:
    """TTFT and e2e of each request against its send time, rejects and failures marked:
    how latency moved while load or faults changed, which percentiles alone cannot show."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ok = [r for r in records if r.ok]
    rejects = [r for r in records if r.rejected]
    failed = [r for r in records if not r.ok and not r.rejected]

    def series(rs: Sequence[RequestRecord], attr: str) -> tuple[list[float], list[float]]:
        pts = [(r.start_s, getattr(r, attr) * 1000) for r in rs if getattr(r, attr) is not None]
        return [p[0] for p in pts], [max(p[1], 1e-3) for p in pts]

    ax.scatter(*series(ok, "e2e_s"), s=6, label="e2e (ok)", color="tab:blue", alpha=0.6)
    ax.scatter(*series(ok, "ttft_s"), s=6, label="TTFT (ok)", color="tab:green", alpha=0.6)
    if rejects:
        ax.scatter(*series(rejects, "e2e_s"), s=14, marker="x", color="tab:red", label="rejected")
    if failed:
        ax.scatter(*series(failed, "e2e_s"), s=14, marker="v", color="black", label="failed")
    if records:
        ax.set_yscale("log")  # rejects take ~1 ms, streams seconds: both must be readable
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or f"{len(records)} requests, {len(rejects)} rejected, {len(failed)} failed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_goodput(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Goodput and throughput against offered load, one point per run (summaries from
    `summarize`): a system that sheds load well keeps goodput flat past its capacity."""
    plt = _pyplot()
    pts = sorted(
        (p for p in points if p.get("offered_rps") is not None), key=lambda p: p["offered_rps"]
    )
    x = [p["offered_rps"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [p.get("throughput_rps") or 0 for p in pts], "o-", label="throughput")
    ax.plot(x, [p.get("goodput_rps") or 0 for p in pts], "s-", label="goodput (met SLO)")
    if x:
        ax.plot([0, max(x)], [0, max(x)], "--", color="grey", label="offered")
    ax.set_xlabel("offered load (req/s)")
    ax.set_ylabel("req/s")
    ax.set_title(title or "goodput against offered load")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
