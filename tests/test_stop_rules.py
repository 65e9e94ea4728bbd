"""The stop rules: pure tests of each rule, then real token streams replayed through StopWatch.

The streams (tests/fixtures/token_streams.json, written by tools/record_token_streams.py) are
SmolLM2-135M-Instruct's greedy generations without stop rules, token ids and the text of each id.
Replaying them shows where the rules stop a real model, what that saves, how often the streamer
decodes, and that the cleaned answer is the one the whole generation gave - except where that one
was looping, which is what the loop rules exist to cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pytest import param

import worker

STREAMS = json.loads((Path(__file__).parent / "fixtures" / "token_streams.json").read_text(encoding="utf-8"))
PIECES = {int(token_id): text for token_id, text in STREAMS["pieces"].items()}
TRIGGER_IDS = worker.stop_trigger_ids([PIECES.get(token_id, "") for token_id in range(max(PIECES) + 1)])


# --- one rule at a time ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, complete", [
    param("NPU Worker Prototype", False, id="line-not-ended"),
    param("NPU Worker Prototype\n", True, id="line-ended"),
    param("\nNPU Worker Prototype\n", True, id="empty-first-line"),
    param("\n\n", False, id="only-blank-lines"),
    param("Here's a short title for the text:\n", False, id="preamble-line-is-not-an-answer"),
    param("Here's a short title for the text:\nNPU Worker\n", True, id="answer-after-preamble"),
    param("Sure!\n", False, id="interjection-is-not-an-answer"),
    param("Title:\n", False, id="label-is-not-an-answer"),
    param("Dear Daniel,\n", False, id="salutation-goes-on"),
    param("Backup done at 03:12:\n1,204 new files", False, id="lead-in-goes-on"),
    param("Backup done at 03:12:\n1,204 new files\n", True, id="lead-in-and-its-line-ended"),
    param("x " * 40, False, id="at-the-cut"),
    param("x " * 40 + "y", True, id="past-the-cut"),
    param("Backup finished", False, id="sentence-not-ended"),
    param("Backup finished. Two", True, id="first-sentence-ended"),
    param("It costs 3.50 now", False, id="a-number-is-not-a-sentence-end"),
    param("\u79fb\u884c\u3057\u307e\u3059\u3002", True, id="cjk-full-stop"),
])
def test_a_title_is_complete_once_an_answer_line_has_ended(text: str, complete: bool) -> None:
    assert (worker.answer_stop("title", text) == worker.STOP_LINE) is complete


def test_a_notification_line_runs_longer_than_a_title_before_it_is_cut() -> None:
    line = "y " * 55  # 110 characters: past a title's 80, within a notification's 140
    assert worker.answer_stop("title", line) == worker.STOP_LINE
    assert worker.answer_stop("notification", line) is None
    assert worker.answer_stop("notification", "Backup done. Two files skipped. ") is None  # may have sentences


@pytest.mark.parametrize("text, rule", [
    param("One. Two. Three. Four.", None, id="four-and-the-last-not-followed"),
    param("One. Two. Three. Four. Five.", None, id="fifth-not-followed-yet"),
    param("One. Two. Three. Four. Five. ", worker.STOP_SENTENCES, id="fifth-followed-by-space"),
    param("One.\nTwo. Three.\nFour. Five.\n", worker.STOP_SENTENCES, id="across-lines"),
    param("It costs 3.", None, id="a-number-may-go-on"),
    param("The backup ran. It copied files. The backup ran. ", worker.STOP_REPEATED_SENTENCE, id="repeated"),
    param("The backup ran. THE BACKUP RAN. ", worker.STOP_REPEATED_SENTENCE, id="repeated-other-case"),
    param("The backup ran. The backup ran", None, id="repeat-not-finished"),
])
def test_a_summary_is_complete_at_its_sentence_limit_or_a_repeated_sentence(text: str, rule: str | None) -> None:
    assert worker.answer_stop("summary", text) == rule


@pytest.mark.parametrize("text, rule", [
    param('{"candidates":[]}', worker.STOP_JSON, id="empty-list"),
    param('{"candidates":[{"text":"Prefers tea"}]}', worker.STOP_JSON, id="closed"),
    param('{"candidates":[{"text":"Prefers tea"}', None, id="open"),
    param('{"candidates":[{"text":"Prefers tea"},{"text":"Lives in Lisbon"},', None, id="two-new"),
    param('{"candidates":[{"text":"Prefers tea"},{"text":"prefers  tea"}', worker.STOP_REPEATED_ITEM,
          id="repeated-item"),
    param('{"candidates":[{"text":"Prefers tea"},{"text":"Prefers tea', None, id="repeat-not-finished"),
])
def test_memory_candidates_are_complete_when_the_json_closes_or_an_item_repeats(text: str, rule: str | None) -> None:
    assert worker.answer_stop("memory_candidate", text) == rule


@pytest.mark.parametrize("stop_rule, raw, text, candidates", [
    param(worker.STOP_REPEATED_ITEM, '{"candidates":[{"text":"A b"},{"text":"C d"},{"text":"a B"}',
          '{"candidates":[{"text":"A b"},{"text":"C d"}]}', ["A b", "C d"], id="closed-before-the-repeat"),
    param(worker.STOP_REPETITION, '{"candidates":[{"text":"A b"},{"text":"1.1.1.1.1.1.1.1',
          '{"candidates":[{"text":"A b"}]}', ["A b"], id="closed-before-the-loop"),
    param(worker.STOP_REPETITION, '{"candidates":[{"text":"0.0.0.0.0.0.0', '{"candidates":[]}', [],
          id="loop-in-the-first"),
    param(None, '{"candidates":[{"text":"A b"},{"text":"C', '{"candidates":[{"text":"A b"},{"text":"C', ["A b"],
          id="budget-cut-stays-cut"),
])
def test_a_list_a_rule_ended_is_closed_where_it_stopped_being_new(
    stop_rule: str | None, raw: str, text: str, candidates: list[str]
) -> None:
    output = worker.clean_output("memory_candidate", raw, stop_rule)
    assert output.text == text and [item["text"] for item in output.candidates or []] == candidates
    assert output.json_valid is (stop_rule is not None)  # only the budget's cut leaves the JSON open


@pytest.mark.parametrize("ids, looping", [
    param([7] * 12, True, id="one-token-12-times"),
    param([7] * 11, False, id="one-token-11-times"),
    param([1, 2, 3, 4] * 3, True, id="block-of-4-three-times"),
    param([9, 1, 2, 3, 4, 1, 2, 3, 4], False, id="block-of-4-twice"),
    param(list(range(40)) * 3, False, id="block-longer-than-32"),
    param(list(range(30)) * 3, True, id="block-of-30-three-times"),
    param([1, 2, 1, 2, 1, 2, 5], False, id="loop-then-something-new"),
])
def test_a_loop_is_the_same_block_of_ids_three_times_in_a_row(ids: list[int], looping: bool) -> None:
    assert worker.repeating_tail(ids) is looping


def test_stop_trigger_ids_are_the_tokens_whose_text_holds_a_trigger_character() -> None:
    texts = ["Hello", " world", ".\n", "}", "]}", " end."]
    triggers = worker.stop_trigger_ids(texts)
    assert triggers["notification"] == {2}
    assert triggers["title"] == triggers["summary"] == {2, 5}  # a title is one sentence
    assert triggers["memory_candidate"] == {3, 4}


# --- StopWatch: cancellation first, the rules, and how often it decodes ----------------------------


def replay(job: str | None, token_ids: list[int], *, cancel_after: int | None = None) -> tuple[worker.StopWatch, int]:
    """Feed token ids one by one, as GenAI's streamer does; (watch, tokens seen when it said so)."""
    triggers = TRIGGER_IDS[job] if job else frozenset()
    calls = 0

    def should_cancel() -> bool:
        nonlocal calls
        calls += 1
        return cancel_after is not None and calls > cancel_after

    watch = worker.StopWatch(should_cancel, job, decode, triggers)
    for index, token_id in enumerate(token_ids):
        if watch.step([token_id]) is not None:
            return watch, index + 1
    return watch, len(token_ids)


def decode(token_ids: list[int]) -> str:
    return "".join(PIECES[token_id] for token_id in token_ids)


def stream(input_id: str, job: str) -> dict[str, Any]:
    (found,) = [s for s in STREAMS["streams"] if s["input"] == input_id and s["job"] == job]
    return found


def test_a_cancel_wins_over_every_rule_and_is_not_a_stop() -> None:
    watch, seen = replay("title", stream("task-01", "title")["token_ids"], cancel_after=3)
    assert (seen, watch.cancelled, watch.stop_rule) == (4, True, None)


def test_without_a_job_only_cancellation_ends_a_generation() -> None:
    token_ids = stream("chat-01", "memory_candidate")["token_ids"]  # it loops: a job's rules would stop it
    watch, seen = replay(None, token_ids)
    assert (seen, watch.stop_rule, watch.decodes) == (len(token_ids), None, 0)


def test_multi_token_writes_are_taken_whole() -> None:
    watch = worker.StopWatch(lambda: False, "summary", lambda ids: "One. Two. Three. Four. Five. ")
    assert watch.step([1, 2, 3]) is None and watch.token_ids == [1, 2, 3]
    assert watch.step(list(range(4, 20))) == worker.STOP and watch.stop_rule == worker.STOP_SENTENCES


# --- real streams ---------------------------------------------------------------------------------

# Rules that end a loop (a repeated sentence, a repeated item, the same tokens over and over):
# there the cleaned answer may lose what the loop would have added, by design.
LOOP_RULES = (worker.STOP_REPETITION, worker.STOP_REPEATED_SENTENCE, worker.STOP_REPEATED_ITEM)


def cleaned(job: str, token_ids: list[int], stop_rule: str | None = None) -> Any:
    try:
        output = worker.clean_output(job, decode(token_ids), stop_rule)
    except worker.EmptyOutput:
        return "<empty_output>"
    return output.candidates if job == "memory_candidate" else output.text


@pytest.mark.parametrize("recorded", STREAMS["streams"], ids=lambda s: f"{s['input']}-{s['job']}")
def test_a_stopped_stream_gives_the_answer_the_whole_stream_gave(recorded: dict[str, Any]) -> None:
    job, token_ids = recorded["job"], recorded["token_ids"]
    watch, seen = replay(job, token_ids)
    assert watch.stop_rule is None or watch.stop_rule in worker.STOP_RULES
    assert watch.decodes <= max(1, seen // 2)  # decoded at trigger tokens, not at every token
    before, after = cleaned(job, token_ids), cleaned(job, token_ids[:seen], watch.stop_rule)
    if watch.stop_rule not in LOOP_RULES:
        assert after == before
    elif job == "summary":  # the sentences before the repeat are the same
        assert before.startswith(after.rstrip(".!?"))
    elif job == "memory_candidate":
        assert all(item in before for item in after) or not after  # a looping item is dropped, not invented


def test_the_rules_save_a_third_of_the_real_streams_tokens() -> None:
    total = saved = 0
    for recorded in STREAMS["streams"]:
        _, seen = replay(recorded["job"], recorded["token_ids"])
        total += len(recorded["token_ids"])
        saved += len(recorded["token_ids"]) - seen
    assert saved / total > 0.3, (saved, total)


@pytest.mark.parametrize("input_id, job, rule", [
    param("task-01", "title", worker.STOP_LINE, id="title-line"),
    param("meeting-01", "summary", worker.STOP_REPEATED_SENTENCE, id="summary-repeat"),
    param("facts-01", "memory_candidate", worker.STOP_REPEATED_ITEM, id="memory-repeat"),
    param("git-01", "memory_candidate", worker.STOP_JSON, id="memory-closed"),
    param("error-01", "memory_candidate", worker.STOP_REPETITION, id="memory-loop"),
])
def test_each_rule_fires_on_a_real_stream(input_id: str, job: str, rule: str) -> None:
    recorded = stream(input_id, job)
    watch, seen = replay(job, recorded["token_ids"])
    assert watch.stop_rule == rule and seen < len(recorded["token_ids"])
