"""The chaos scenarios in reduced form: each starts its own fleet and must pass."""

from __future__ import annotations

import pytest

from loadtest.chaos import SCENARIOS


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    res = SCENARIOS[name](True)
    assert res["scenario"] == name
    assert res["passed"], res["figures"]
