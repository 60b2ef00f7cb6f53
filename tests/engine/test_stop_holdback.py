"""The stop-string holdback against its definition: the longest suffix of the text that is
a proper prefix of a stop string (tried at every length), on small alphabets where
suffixes and prefixes overlap often."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.output_processor import _holdback

small = st.text(alphabet="ab ", max_size=14)


def _by_definition(text: str, stops: list[str]) -> int:
    return max(
        (n for s in stops for n in range(1, len(s)) if n <= len(text) and text.endswith(s[:n])),
        default=0,
    )


@settings(max_examples=2000, deadline=None)
@given(small, st.lists(small.filter(bool), max_size=4))
def test_holdback_is_the_longest_suffix_that_starts_a_stop(text: str, stops: list[str]) -> None:
    assert _holdback(text, stops) == _by_definition(text, stops)


def test_holdback_examples() -> None:
    assert _holdback("the end of", ["of course"]) == 2
    assert _holdback("abc", ["abcd"]) == 3
    assert _holdback("abcd", ["abcd"]) == 0  # whole: a stop, cut elsewhere, not held
    assert _holdback("", ["x"]) == 0
    assert _holdback("xx", ["x"]) == 0  # a one-character stop has no proper prefix
