"""Property tests of the pure core: request parsing and validation, and output clean-up.

Hypothesis runs derandomized (a fixed seed derived from each test), with bounded ``max_examples``,
no example database and no deadline, so that every run tries the same inputs.

- parse_json_body + validate_job_request: for any JSON-able body and any bytes, either a JobRequest
  that meets every documented limit (CONTRACT.md, POST /v1/worker/generate) or a WorkerError with
  status 400 or 413 whose message never echoes the input - never another exception.
- clean_output: for any text, every job either raises EmptyOutput (memory_candidate never does) or
  returns the documented shape (CONTRACT.md, Jobs).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import worker

MARK = "ZQXMARK"  # in every generated string: an error message must never contain it
FIELDS = ["job", "input", "max_new_tokens", "timeout_s"]
LIMITS = [
    worker.Limits(),
    worker.Limits(max_input_chars=40, max_new_tokens=10, request_timeout_s=5.0),
]
QUOTES = worker._QUOTES
# CONTRACT.md does not define "sentence"; this is the plain reading (end mark, then white space).
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def fast(max_examples: int) -> Any:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# --- strategies ------------------------------------------------------------------------------------

marked_text = st.text(max_size=12).map(lambda text: text + MARK)
any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates and controls included
numbers = st.one_of(
    st.integers(min_value=-3, max_value=300),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # nan and infinities included
    st.floats(min_value=-1, max_value=130),
    st.sampled_from([0, 1, 64, 65, 96, 97, 256, 257, 0.0, 1e-320, 5.0, 120.0, 120.0000001, True, False]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, marked_text)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(marked_text, children, max_size=4),
    max_leaves=12,
)
inputs = st.one_of(
    marked_text,
    any_text.map(lambda text: text + MARK),
    st.sampled_from(["", " ", "\t\n\u3000", "\x00", "a\x00b", "\ud800", MARK + "\udfff", "x"]),
    st.builds(lambda char, n: MARK + char * n, st.characters(exclude_categories=()),
              st.sampled_from([33, 34, 35, 5990, 5992, 5993, 6000, 6001])),
)
field_values = {
    "job": st.one_of(st.sampled_from(list(worker.JOBS)), json_values),
    "input": st.one_of(inputs, json_values),
    "max_new_tokens": st.one_of(st.none(), numbers, json_values),
    "timeout_s": st.one_of(st.none(), numbers, json_values),
}


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly near-valid request bodies: some documented fields, some values of the wrong kind, extras."""
    body: dict[str, Any] = {}
    for name in FIELDS:
        if draw(st.integers(0, 9)) < 8:  # a field is present four times in five
            body[name] = draw(field_values[name])
    body.update(draw(st.dictionaries(marked_text, json_values, max_size=2)))
    return body


# --- parse_json_body + validate_job_request --------------------------------------------------------


def check_request(body: dict[str, Any], limits: worker.Limits, job: str | None) -> None:
    """validate_job_request's whole contract for one body: a valid JobRequest, or a 400/413."""
    try:
        request = worker.validate_job_request(body, limits, job=job)
    except worker.WorkerError as exc:
        assert exc.status in (400, 413), (exc.status, exc.type)
        assert exc.type in ("invalid_request", "input_too_long"), exc.type
        assert (exc.status == 413) == (exc.type == "input_too_long")
        if exc.type == "input_too_long":
            assert isinstance(body.get("input"), str) and len(body["input"]) > limits.max_input_chars
        assert isinstance(exc.message, str) and exc.message and MARK not in exc.message
        return
    allowed = {"input", "max_new_tokens", "timeout_s"} | (set() if job else {"job"})
    assert set(body) <= allowed
    assert isinstance(request, worker.JobRequest)
    assert request.job in worker.JOBS and request.job == (job or body["job"])
    text = request.input_text
    assert text is body["input"] and type(text) is str
    assert 1 <= len(text) <= limits.max_input_chars and text.strip()
    assert "\x00" not in text and worker.is_encodable(text)
    maximum = min(worker.JOBS[request.job].max_new_tokens, limits.max_new_tokens, worker.DEFAULT_MAX_NEW_TOKENS_LIMIT)
    if body.get("max_new_tokens") is None:
        assert request.max_new_tokens is None
    else:
        assert type(request.max_new_tokens) is int and 1 <= request.max_new_tokens <= maximum
    if body.get("timeout_s") is None:
        assert request.timeout_s is None
    else:
        assert type(request.timeout_s) is float and math.isfinite(request.timeout_s)
        assert 0 < request.timeout_s <= limits.request_timeout_s


@fast(300)
@given(body=bodies(), limits=st.sampled_from(LIMITS), job=st.sampled_from([None, "memory_candidate", "notification"]))
@example(body={"job": "title", "input": "x"}, limits=LIMITS[0], job=None)
@example(body={"job": "title", "input": "x" * 6000, "max_new_tokens": 64, "timeout_s": 120}, limits=LIMITS[0], job=None)
@example(body={"input": "x", "max_new_tokens": 96}, limits=LIMITS[0], job="notification")
def test_validate_job_request_gives_a_valid_job_or_a_400_or_413(
    body: dict[str, Any], limits: worker.Limits, job: str | None
) -> None:
    check_request(body, limits, job)


def _check_bytes(data: bytes, limits: worker.Limits, job: str | None) -> None:
    try:
        body = worker.parse_json_body(data)
    except worker.WorkerError as exc:
        assert (exc.status, exc.type) == (400, "invalid_json")
        assert MARK not in exc.message
        return
    assert isinstance(body, dict)
    check_request(body, limits, job)


@fast(300)
@given(
    value=st.one_of(bodies(), json_values),
    limits=st.sampled_from(LIMITS),
    job=st.sampled_from([None, "notification"]),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1"]),
)
@example(value={"job": "title", "input": "x", "timeout_s": math.nan}, limits=LIMITS[0], job=None, encoding="utf-8")
@example(value={"job": "title", "input": "\ud800" + MARK}, limits=LIMITS[0], job=None, encoding="utf-8")
def test_any_json_document_parses_and_validates_or_is_a_400_or_413(
    value: Any, limits: worker.Limits, job: str | None, encoding: str
) -> None:
    text = json.dumps(value, ensure_ascii=encoding != "utf-8")  # NaN/Infinity allowed: they must be refused
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:  # a lone surrogate written raw: the bytes are not UTF-8 either
        data = text.encode(encoding, "surrogatepass")
    _check_bytes(data, limits, job)


@fast(400)
@given(data=st.binary(max_size=300), limits=st.sampled_from(LIMITS))
@example(data=b"[" * 100_000, limits=LIMITS[0])
@example(data=b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", limits=LIMITS[0])
@example(data=b'{"job": "title", "input": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", limits=LIMITS[0])
@example(data=b'\xef\xbb\xbf{"job": "title", "input": "x"}', limits=LIMITS[0])
def test_any_bytes_are_a_job_or_a_400_or_413(data: bytes, limits: worker.Limits) -> None:
    _check_bytes(data, limits, None)


@fast(200)
@given(
    body=bodies().map(lambda body: json.dumps(body).encode()),
    position=st.integers(min_value=0),
    insert=st.binary(min_size=0, max_size=3),
    cut=st.integers(min_value=0, max_value=3),
)
def test_mutated_json_bodies_are_a_job_or_a_400_or_413(body: bytes, position: int, insert: bytes, cut: int) -> None:
    position %= len(body) + 1
    _check_bytes(body[:position] + insert + body[position + cut :], LIMITS[0], None)


@fast(60)
@given(depth=st.one_of(st.integers(min_value=0, max_value=3000), st.sampled_from([100_000, 60_000])),
       kind=st.sampled_from("[{"))
def test_any_nesting_depth_is_a_400(depth: int, kind: str) -> None:
    opener, closer = (b"[", b"]") if kind == "[" else (b'{"a":', b"}")
    data = b'{"job": "title", "input": ' + opener * depth + b"1" + closer * depth + b"}"
    with pytest.raises(worker.WorkerError) as caught:
        worker.validate_job_request(worker.parse_json_body(data), LIMITS[0])
    # Where parsing stops depends on the recursion limit and the stack in use: either 400 is right.
    assert caught.value.status == 400 and caught.value.type in ("invalid_request", "invalid_json")
    if depth >= 60_000:
        assert (caught.value.type, caught.value.message) == ("invalid_json", "request body is nested too deeply")


# --- clean_output ----------------------------------------------------------------------------------

# Fragments of what small models emit around an answer: preambles, labels, markdown, quotes,
# reasoning blocks, sentence ends, line separators, repetitions and JSON pieces.
FRAGMENTS = [
    "a", "b", "T", "tea", "NPU", "1.1.1.1", " ", "  ", ".", "..", ":", "!", "?", ",", "-", "\u2026", "\n",
    "\r\n", "\u2028", "\x85", "\x1c", "\t", '"', "'", "`", "*", "**", "\u201c", "\u201d", "\u00ab", "\u00bb",
    "# ", "## ", "> ", "- ", "* ", "1. ", "2) ", "```", "```json\n", "Title: ", "Summary:", "Answer: ",
    "Notification:", "Sure! ", "Sure, here is a title:", "Here's the summary: ", "Okay.", "I think",
    "<think>", "</think>", "<think>hidden</think>", "foo bar ", "foo bar foo bar foo bar ", "It works. ",
    "It works. ", "Mr. Smith. ", '"Quoted." ', "(aside) ", "{", "}", "[", "]", '{"candidates": [',
    '{"text": "', '"}', ", ", "]}", '"...', "null", "42",
]
model_text = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
raw_texts = st.one_of(
    model_text,
    st.text(st.characters(exclude_categories=()), max_size=200),  # any code point, controls and surrogates included
    st.text(st.sampled_from(" .!?:\"'*#-\n\u2026abcT1"), max_size=200),
    st.builds(lambda parts, n: "".join(parts) * n, st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6),
              st.integers(50, 400)),  # long
)


def one_line(text: str) -> bool:
    return len(text.splitlines()) == 1 and text == text.strip()


def check_clean(job: str, raw: str) -> worker.CleanOutput | None:
    """The documented shape of every job's output, or EmptyOutput."""
    try:
        out = worker.clean_output(job, raw)
    except worker.EmptyOutput as exc:
        assert job != "memory_candidate"
        assert exc.status == 502 and exc.type == "empty_output"
        return None
    text = out.text
    assert isinstance(text, str)
    if job == "memory_candidate":
        assert text == raw.strip()
        assert isinstance(out.json_valid, bool)
        assert isinstance(out.candidates, list) and len(out.candidates) <= worker.MEMORY_MAX_CANDIDATES
        if not out.json_valid:
            assert out.candidates == []
        seen = set()
        for candidate in out.candidates:
            assert list(candidate) == ["text"] and type(candidate["text"]) is str
            fact = candidate["text"]
            assert 1 <= len(fact) <= worker.MEMORY_CANDIDATE_MAX_CHARS and worker.has_text(fact)
            assert worker.is_encodable(fact) and one_line(fact)
            assert fact.casefold() not in seen
            seen.add(fact.casefold())
        return out
    assert out.candidates is None and out.json_valid is None
    assert worker.has_text(text) and one_line(text)
    if job == "title":
        assert len(text) <= worker.TITLE_MAX_CHARS
        assert not text.endswith(".")
        assert not (text[0] in QUOTES and text[-1] in QUOTES), text  # not wrapped in quotes
    elif job == "notification":
        assert len(text) <= worker.NOTIFICATION_MAX_CHARS
    else:
        assert "\n" not in text
        assert len(SENTENCE_SPLIT.split(text)) <= worker.SUMMARY_MAX_SENTENCES
    return out


@fast(500)
@given(raw=raw_texts)
@example(raw="")
@example(raw="<think>" + "x" * 5000)
@example(raw='{"candidates": [' + '{"text": "a fact"}, ' * 50 + '{"text": "last"}]}')
@example(raw='{"candidates": [{"text": "\\ud800"}, {"text": "' + "w " * 200 + '"}]}')
@example(raw="[" * 5000)
def test_clean_output_gives_the_documented_shape_or_empty_output(raw: str) -> None:
    for job in worker.JOBS:
        check_clean(job, raw)


# Titles a model would plausibly emit: words, digits and ordinary punctuation, no markup.
plain_titles = st.lists(
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), min_size=1, max_size=12),
    min_size=1,
    max_size=14,
).flatmap(lambda words: st.lists(
    st.sampled_from([" ", ", ", " - ", ": ", "! ", "? ", "'s "]), min_size=len(words), max_size=len(words)
).map(
    lambda seps: "".join(word + sep for word, sep in zip(words, seps))
))


@fast(300)
@given(raw=plain_titles)
def test_cleaning_a_clean_plain_title_again_changes_nothing(raw: str) -> None:
    try:
        once = worker.clean_output("title", raw).text
    except worker.EmptyOutput:
        return
    assert worker.clean_output("title", once).text == once
    assert (worker.clean_output("notification", worker.clean_output("notification", raw).text).text
            == worker.clean_output("notification", raw).text)


@pytest.mark.parametrize("raw", ["''>T", "Title: Title: foo", "Title: Here is: x", "`1. >"])
def test_cleaning_a_clean_title_again_changes_nothing_for_any_input(raw: str) -> None:
    try:
        once = worker.clean_output("title", raw).text
    except worker.EmptyOutput:
        return  # nothing left at the first pass is as stable as it gets
    assert worker.clean_output("title", once).text == once


def test_a_title_is_never_wrapped_in_quotes() -> None:
    out = check_clean("title", '" " "Hello" " "')
    assert out is not None and out.text == "Hello"


@pytest.mark.parametrize("raw", ['"# Big News"', '"- item"', '**"## x"**'])
def test_a_title_has_no_markdown_even_inside_quotes(raw: str) -> None:
    text = worker.clean_output("title", raw).text
    assert not re.match(r"(?:#{1,6}\s|[-*+]\s|>\s)", text), text
