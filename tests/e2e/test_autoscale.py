"""`breakwater up --autoscale`: workers start when requests queue and retire when they stop,
drained first; the policy's arithmetic is tested on its own."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections import Counter

from breakwater.autoscale import AutoscalePolicy, Recommender
from loadtest.fleet import Proc, admin_json, wait_for

TOKEN = "autoscale-test-token"


def test_the_recommender_scales_up_at_once_and_down_after_its_window() -> None:
    r = Recommender(AutoscalePolicy(1, 4, target_queue=4, scale_down_window_s=10, interval_s=1))
    assert r.recommend(0.0, 1, waiting=0) == 1
    assert r.recommend(1.0, 1, waiting=13) == 4  # ceil(13 / 4), at once
    assert r.recommend(2.0, 4, waiting=100) == 4  # never above max
    for t in range(3, 12):  # wants 1, but the window still holds the burst
        assert r.recommend(float(t), 4, waiting=0) == 4
    assert r.recommend(13.0, 4, waiting=0) == 3  # the whole window wanted fewer: one down
    assert r.recommend(14.0, 3, waiting=0) == 2
    assert r.recommend(15.0, 2, waiting=5) == 2  # wants 2 now: stays


def test_up_autoscale_adds_a_worker_under_a_queue_and_retires_it_after() -> None:
    up = Proc(
        [
            "up", "--engine", "sim", "--sim-preset", "tiny", "--workers", "1", "--port", "0",
            "--max-num-seqs", "1", "--autoscale", "--max-workers", "2", "--target-queue", "2",
            "--scale-down-window", "3",
        ],
        "Breakwater is up",
        timeout=240,
        env={"BREAKWATER_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    stop = threading.Event()
    served: Counter[str] = Counter()
    errors: Counter[int] = Counter()
    try:
        text = "".join(up.stdout_lines)
        gateway = re.search(r"gateway (http://\S+)", text).group(1)  # type: ignore[union-attr]
        model = re.search(r"model (\S+)\)", text).group(1)  # type: ignore[union-attr]
        admin = re.search(r"admin: (http://\S+)/admin/workers", text).group(1)  # type: ignore[union-attr]
        up.ready["admin"] = admin

        def workers() -> list[str]:
            return [
                w["worker_id"] for w in admin_json(up, "/admin/workers", token=TOKEN)["workers"]
            ]

        def client(i: int) -> None:
            body = {"model": model, "prompt": f"client {i}", "max_tokens": 200, "ignore_eos": True}
            while not stop.is_set():
                req = urllib.request.Request(
                    gateway + "/v1/completions",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        r.read()
                        served[r.headers["x-breakwater-worker"]] += 1
                except urllib.error.HTTPError as e:
                    errors[e.code] += 1
                    if e.code == 503:  # shed at the door: come back when told
                        stop.wait(float(e.headers.get("Retry-After", "1")))

        assert len(workers()) == 1
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(10)]
        for t in threads:
            t.start()
        wait_for(lambda: len(workers()) == 2, timeout=120)
        wait_for(lambda: len(served) == 2, timeout=60)  # the new worker takes traffic
        stop.set()
        for t in threads:
            t.join(timeout=90)
        wait_for(lambda: len(workers()) == 1, timeout=90)
        log = "".join(up.stdout_lines)
        assert "autoscale: 1 -> 2 workers" in log and "autoscale: 2 -> 1 workers" in log
        # shed with Retry-After while the fleet was short (the signal that scaled it up);
        # nothing else went wrong, on the way up or down
        assert set(errors) <= {503}, errors
    finally:
        stop.set()
        up.stop()
