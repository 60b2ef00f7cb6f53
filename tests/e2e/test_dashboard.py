"""The operators' dashboard in headless Chromium (Debian's package), driven over the
DevTools protocol: it lists every replica, drains one by its button, and draws charts."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest.fleet import (
    ADMIN_TOKEN,
    admin_call,
    admin_json,
    start_gateway,
    start_sim_worker,
    wait_for,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)


class Browser:
    """Headless Chromium and one page, over the DevTools protocol."""

    def __init__(self, profile: str) -> None:
        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # Its singleton socket directory (org.chromium.Chromium.*) lands in TMPDIR: the
            # profile's, removed with it, not loose in /tmp.
            env={**os.environ, "TMPDIR": profile},
        )
        self.ids = itertools.count(1)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        self.port = 0
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "DevTools listening on ws://" in line:
                self.port = int(line.split("ws://")[1].split("/")[0].split(":")[1])
                break
            if not line and self.proc.poll() is not None:
                break
        assert self.port, "chromium did not start its DevTools endpoint"

    def page_ws(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
        return str(pages[0]["webSocketDebuggerUrl"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def call(ws: aiohttp.ClientWebSocketResponse, ids: Any, method: str, **params: Any) -> Any:
    n = next(ids)
    await ws.send_json({"id": n, "method": method, "params": params})
    while True:
        msg = await ws.receive_json(timeout=60)
        if msg.get("id") == n:
            assert "error" not in msg, msg
            return msg.get("result", {})


async def evaluate(ws: aiohttp.ClientWebSocketResponse, ids: Any, expr: str) -> Any:
    res = await call(ws, ids, "Runtime.evaluate", expression=expr, returnByValue=True)
    return res["result"].get("value")


async def until(
    ws: aiohttp.ClientWebSocketResponse, ids: Any, expr: str, timeout: float = 60
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await evaluate(ws, ids, expr)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"not true within {timeout}s: {expr}")


def test_dashboard_lists_replicas_drains_by_button_and_draws(tmp_path: Path) -> None:
    workers = [start_sim_worker() for _ in range(2)]
    gw = start_gateway(*[x for w in workers for x in ("--worker", w.ready["grpc"])])
    profile = tempfile.mkdtemp(prefix="bw-chromium-")
    browser = Browser(profile)
    try:
        wait_for(lambda: len(admin_json(gw, "/admin/workers")["workers"]) == 2, timeout=60)
        ids = sorted(w["worker_id"] for w in admin_json(gw, "/admin/workers")["workers"])
        url = f"{gw.ready['admin']}/admin/dashboard#token={ADMIN_TOKEN}"

        def traffic() -> None:
            for i in range(20):
                body = json.dumps({"model": "sim", "prompt": f"p{i}", "max_tokens": 2}).encode()
                req = urllib.request.Request(
                    gw.ready["http"] + "/v1/completions", body, {"Content-Type": "application/json"}
                )
                urllib.request.urlopen(req, timeout=30).read()

        async def drive() -> bytes:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(browser.page_ws(), max_msg_size=0) as ws,
            ):
                n = itertools.count(1)
                await call(ws, n, "Page.enable")
                await call(ws, n, "Page.navigate", url=url)
                rows = "document.querySelectorAll('#workers tr').length"
                assert await until(ws, n, f"{rows} === 2 && {rows}")
                shown = await evaluate(
                    ws,
                    n,
                    "[...document.querySelectorAll('#workers tr')].map(r => r.dataset.worker)",
                )
                assert sorted(shown) == ids
                await asyncio.to_thread(traffic)
                # a chart line appears once two samples with traffic between them are in
                for chart in ("rps", "ttft", "latency"):
                    await until(
                        ws, n, f"document.querySelector('#chart-{chart} polyline') !== null"
                    )
                # drain the first replica by its button; the page shows the new state
                row = f"document.querySelector('tr[data-worker=\"{ids[0]}\"]')"
                await evaluate(ws, n, f"{row}.querySelector('button[data-action=drain]').click()")
                await until(ws, n, f"{row}.querySelector('.admin').textContent === 'drained'")
                # names come from replicas and upstreams: shown as text, never as markup
                # (the page holds the admin token)
                hostile = '<b/id="injected">x</b>'
                body = {"address": "127.0.0.1:1", "worker_id": hostile}
                assert (await asyncio.to_thread(admin_call, gw, "POST", "/admin/upstreams", body))[
                    0
                ] == 200
                assert await until(ws, n, f"{rows} === 3")
                assert await evaluate(ws, n, "document.getElementById('injected') === null")
                cells = "[...document.querySelectorAll('#workers td')].map(c => c.textContent)"
                assert any(hostile in c for c in await evaluate(ws, n, cells))
                await asyncio.sleep(0.5)
                shot = await call(ws, n, "Page.captureScreenshot", format="png")
                import base64

                return base64.b64decode(shot["data"])

        png = asyncio.run(drive())
        view = {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}
        assert view[ids[0]]["admin"] == "drained" and view[ids[1]]["admin"] is None
        # the screenshot is a real rendering of the page, not a blank canvas
        from PIL import Image

        (tmp_path / "dashboard.png").write_bytes(png)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert image.size[0] >= 1000
        colours = image.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 50, "the screenshot looks blank"
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
        gw.stop()
        for w in workers:
            w.stop()
