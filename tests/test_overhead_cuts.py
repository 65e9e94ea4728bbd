"""The cuts of issue #15 (BENCHMARKS.md, "Overhead: where the rest goes") change speed, not results."""

from __future__ import annotations

import random
import re

import worker

# _REPEATED_PHRASE before the cut: the same pattern without a \b after each word.
REPEATED_PHRASE_BEFORE = re.compile(r"\b([^\W\d_]\w*(?:\W+\w+){0,5}?)(?:\W+\1\b){2,}", re.IGNORECASE)
# Words and gaps that probe case folding, digits, underscores, combining marks and non-ASCII.
WORDS = ["foo", "Foo", "bar", "BAR", "a", "1.1", "x_y", "\u00df", "SS", "\u017f", "s", "K", "\u212a", "k",
         "\u00fcber", "\u00dcber", "\u65e5\u672c", "1", "__", "ab1", "\u00e9", "\u00c9", "\u0130", "i", "\u0131",
         "e\u0301", "the NPU", "runs"]
GAPS = [" ", "  ", ", ", ". ", "-", "\n", "!", "...", "'", "", "_", "\u00a0"]


def test_repeated_phrase_finds_what_it_found_before() -> None:
    rng = random.Random(15)
    for _ in range(20000):
        text = "".join(rng.choice(WORDS) + rng.choice(GAPS) for _ in range(rng.randint(1, 14)))
        assert worker._REPEATED_PHRASE.sub(r"\1", text) == REPEATED_PHRASE_BEFORE.sub(r"\1", text), text


def test_repeated_phrase_still_collapses() -> None:
    assert worker.collapse_repeats("foo bar foo bar foo bar baz") == "foo bar baz"
    assert worker.collapse_repeats("Hello hello HELLO world") == "Hello world"
    assert worker.collapse_repeats("1.1.1.1 stays") == "1.1.1.1 stays"


def test_header_values_refuse_the_control_characters_they_refused_before() -> None:
    for code in range(256):  # parse_head reads a head as latin-1: every value is made of these
        refused_before = (code < 0x20 and chr(code) != "\t") or code == 0x7F
        head = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Probe: a" + bytes([code]) + b"b\r\n\r\n"
        if chr(code) in "\r\n":
            continue  # these end the line instead (test_http_rfc covers them)
        try:
            worker.parse_head(head)
        except worker.ProtocolError as exc:
            assert refused_before, code
            assert exc.message == "control character in a header field value"
        else:
            assert not refused_before, code
