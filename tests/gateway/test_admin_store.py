"""The admin overrides in their file store (a gateway without Redis): concurrent changes,
and a drain and an eject kept apart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.admin.overrides import WORKER, FileStore, Overrides
from tests.gateway._async import run


def test_concurrent_changes_are_all_kept(tmp_path: Path) -> None:
    """Each change read, changed and wrote the whole file in a thread of its own, through
    one temporary file: of three weights set at once, one survived (or a call failed)."""

    async def main() -> None:
        overrides = Overrides(FileStore(str(tmp_path)))
        await overrides.start()
        try:
            ids = [f"w{i}" for i in range(16)]
            await asyncio.gather(*(overrides.put("weight:", w, 2.0, {"by": "t"}) for w in ids))
            fresh = Overrides(FileStore(str(tmp_path)))  # as a sibling process reads it
            await fresh.refresh()
            assert fresh.weights == dict.fromkeys(ids, 2.0)
            assert len((tmp_path / "admin-audit.jsonl").read_text().splitlines()) == 16
        finally:
            await overrides.close()

    run(main())


def test_readmit_ends_an_eject_and_leaves_a_drain(tmp_path: Path) -> None:
    async def main() -> None:
        overrides = Overrides(FileStore(str(tmp_path)))
        await overrides.start()
        try:
            await overrides.act("drain", "w1", "op")
            await overrides.act("eject", "w1", "op")
            await overrides.act("readmit", "w1", "op")
            assert overrides.blocked("w1") and overrides.states["w1"] == "drained"
            await overrides.act("eject", "w1", "op")
            await overrides.act("undrain", "w1", "op")
            assert overrides.blocked("w1") and overrides.states["w1"] == "ejected"
            await overrides.act("readmit", "w1", "op")
            assert not overrides.blocked("w1") and "w1" not in overrides.states
            # an eject stored by an earlier version (in the drain's entry): readmit ends it
            await overrides.store.apply(WORKER + "w2", "ejected", {"by": "old"})
            await overrides.refresh()
            await overrides.act("undrain", "w2", "op")
            assert overrides.states["w2"] == "ejected"
            await overrides.act("readmit", "w2", "op")
            assert not overrides.blocked("w2")
        finally:
            await overrides.close()

    run(main())
