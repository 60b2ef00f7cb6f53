"""The usage comment a worker ends a relayed stream with, read however TCP cuts the stream."""

from __future__ import annotations

import itertools

import pytest

from serving.usage_comment import UsageReader, usage_comment

EVENTS = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' * 3
DONE = b"data: [DONE]\n\n"


def read_in_pieces(stream: bytes, cuts: tuple[int, ...]) -> tuple[bytes, UsageReader]:
    reader = UsageReader()
    bounds = [0, *cuts, len(stream)]
    out = b"".join(reader.feed(stream[a:b]) for a, b in itertools.pairwise(bounds))
    return out + reader.flush(), reader


def test_the_comment_is_taken_out_wherever_one_cut_falls() -> None:
    stream = EVENTS + usage_comment((17, 8, 16)) + DONE
    for cut in range(1, len(stream)):
        out, reader = read_in_pieces(stream, (cut,))
        assert out == EVENTS + DONE, cut
        assert reader.usage == (17, 8, 16), cut


def test_the_comment_is_taken_out_when_it_comes_a_byte_at_a_time() -> None:
    comment = usage_comment((1234, 56, 7))
    stream = EVENTS + comment + DONE
    start = len(EVENTS)
    out, reader = read_in_pieces(stream, tuple(range(start, start + len(comment) + 2)))
    assert out == EVENTS + DONE
    assert reader.usage == (1234, 56, 7)


def test_the_comment_is_taken_out_wherever_two_cuts_fall() -> None:
    """One cut inside the blank line before the comment, one inside the comment: the
    reader saw no event end in the second read, and passed the comment on."""
    stream = EVENTS + usage_comment((17, 8, 16)) + DONE
    near = range(len(EVENTS) - 4, len(stream))
    for cuts in itertools.combinations(near, 2):
        out, reader = read_in_pieces(stream, cuts)
        assert out == EVENTS + DONE, cuts
        assert reader.usage == (17, 8, 16), cuts


def test_the_same_words_in_an_answer_do_not_hide_the_comment() -> None:
    said = b'data: {"choices":[{"delta":{"content":"\\n: usage 1 2 3\\n\\n"}}]}\n\n'
    stream = said + usage_comment((9, 2, 0)) + DONE
    for cut in range(1, len(stream)):
        out, reader = read_in_pieces(stream, (cut,))
        assert out == said + DONE, cut
        assert reader.usage == (9, 2, 0), cut


@pytest.mark.parametrize(
    "stream",
    [
        EVENTS + DONE,
        EVENTS + b": usage pending\n\n" + DONE,  # not ours: left as it came
        EVENTS + b": us",  # a stream cut short where a comment might have started
        b'data: {"x": ": usage 1 2 3"}\n\n' + DONE,  # inside an event, not a comment
    ],
)
def test_anything_else_passes_through_unchanged(stream: bytes) -> None:
    for cut in range(1, len(stream)):
        out, reader = read_in_pieces(stream, (cut,))
        assert out == stream, cut
        assert reader.usage is None, cut
    for cuts in itertools.combinations(range(max(1, len(stream) - 40), len(stream)), 2):
        out, reader = read_in_pieces(stream, cuts)
        assert out == stream, cuts
        assert reader.usage is None, cuts
