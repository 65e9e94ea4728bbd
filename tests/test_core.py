"""Example-based tests of the pure core, the adapter helpers and the CLI parsing of worker.py.

Nothing here imports openvino or loads a model: every case runs on strings, dicts and a fake sysfs
tree in tmp_path.  The expected values are the documented behaviour (CONTRACT.md: Limits, Jobs,
Token budget, Errors); the Errors and Jobs tables are parsed from CONTRACT.md itself so that the
docs and the code cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import worker

CONTRACT = Path(worker.__file__).resolve().parent / "CONTRACT.md"

# A unique string that must never come back in an error message (CONTRACT.md: "Error messages
# never echo the input").
MARKER = "ZqXMarker7731"

JOB_DEFAULTS = {  # CONTRACT.md, Jobs: default / max max_new_tokens
    "title": (40, 64),
    "summary": (192, 256),
    "notification": (64, 96),
    "memory_candidate": (200, 256),
}


def param(*values: Any, id: str, **kwargs: Any) -> Any:
    return pytest.param(*values, id=id, **kwargs)


def contract_section(title: str) -> str:
    """The text of one '## ' or '### ' section of CONTRACT.md, up to the next heading of any level."""
    text = CONTRACT.read_text(encoding="utf-8")
    match = re.search(rf"^#{{2,3}} {re.escape(title)}\n(.*?)(?=^#{{1,3}} )", text, re.MULTILINE | re.DOTALL)
    assert match, f"section {title!r} not found in CONTRACT.md"
    return match.group(1)


def table_rows(section: str) -> list[list[str]]:
    """Data rows of the first markdown table in a section, cells stripped."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if set("".join(cells)) <= set("- "):
            continue  # the separator row
        rows.append(cells)
    return rows[1:]  # without the header


# ==================================================================================================
# 1. Output clean-up: title
# ==================================================================================================

EXPECTED_TITLE = "NPU Worker Prototype"

TITLE_CASES = [
    param("NPU Worker Prototype", id="plain"),
    param("  NPU Worker Prototype  \n", id="surrounding-whitespace"),
    param('"NPU Worker Prototype"', id="straight-double-quotes"),
    param("'NPU Worker Prototype'", id="straight-single-quotes"),
    param("\u201cNPU Worker Prototype\u201d", id="curly-double-quotes"),
    param("\u2018NPU Worker Prototype\u2019", id="curly-single-quotes"),
    param("\u00abNPU Worker Prototype\u00bb", id="guillemets"),
    param("`NPU Worker Prototype`", id="backticks"),
    param("# NPU Worker Prototype", id="markdown-h1"),
    param("### NPU Worker Prototype", id="markdown-h3"),
    param("**NPU Worker Prototype**", id="bold"),
    param("*NPU Worker Prototype*", id="italic"),
    param("- NPU Worker Prototype", id="dash-bullet"),
    param("* NPU Worker Prototype", id="star-bullet"),
    param("\u2022 NPU Worker Prototype", id="unicode-bullet"),
    param("1. NPU Worker Prototype\n2. Bounded NPU Worker", id="numbered-list"),
    param("> NPU Worker Prototype", id="blockquote"),
    param("```\nNPU Worker Prototype\n```", id="code-fence"),
    param("```text\nNPU Worker Prototype\n```", id="code-fence-with-language"),
    param("Title: NPU Worker Prototype", id="label"),
    param("TITLE:NPU Worker Prototype", id="label-upper-no-space"),
    param("**Title:** NPU Worker Prototype", id="bold-label"),
    param('Title: "NPU Worker Prototype"', id="label-and-quotes"),
    param("Sure! Here is a title:\nNPU Worker Prototype", id="preamble-line"),
    param("Sure! Here is a title:\n\n**NPU Worker Prototype**", id="preamble-line-then-bold"),
    param('Here\'s a short title for the text:\n\n"NPU Worker Prototype"', id="heres-preamble-then-quotes"),
    param("Certainly!\nNPU Worker Prototype", id="interjection-line"),
    param("Sure! Here is a title: NPU Worker Prototype", id="preamble-same-line"),
    param('Here is a concise title: "NPU Worker Prototype."', id="preamble-same-line-quoted-period"),
    param("<think>\nThe user wants a title.\n</think>\n\nNPU Worker Prototype", id="think-closed"),
    param("<THINK>short</THINK>NPU Worker Prototype", id="think-uppercase-same-line"),
    param("NPU Worker Prototype\nThis title captures the main point of the text.", id="multiple-lines-first-wins"),
    param("NPU Worker Prototype.", id="trailing-period"),
    param("NPU Worker Prototype...", id="trailing-dots"),
    param("NPU Worker Prototype\u2026", id="trailing-ellipsis-char"),
    param('"NPU Worker Prototype."', id="period-inside-quotes"),
    param('"NPU Worker Prototype".', id="period-outside-quotes"),
    param(
        "<think>hmm</think>\nSure! Here is a title:\n\n**Title:** \u201cNPU Worker Prototype.\u201d",
        id="everything-at-once",
    ),
    param("NPU Worker Prototype NPU Worker Prototype NPU Worker Prototype", id="runaway-phrase"),
]


@pytest.mark.parametrize("raw", TITLE_CASES)
def test_clean_title_removes_decoration(raw: str) -> None:
    assert worker.clean_title(raw) == EXPECTED_TITLE
    assert worker.clean_output("title", raw).text == EXPECTED_TITLE


@pytest.mark.parametrize(
    "raw, expected",
    [
        param("Is the NPU Worker Ready?", "Is the NPU Worker Ready?", id="question-mark-kept"),
        param('"Is the NPU Worker Ready?"', "Is the NPU Worker Ready?", id="question-mark-kept-in-quotes"),
        param("NPU Worker Ready!", "NPU Worker Ready!", id="exclamation-kept"),
        param("NPU NPU NPU NPU", "NPU", id="runaway-word"),
        param("Fast worker fast worker fast worker fast worker", "Fast worker", id="runaway-phrase-mixed-case"),
        param("Version 2.1 of the Worker.", "Version 2.1 of the Worker", id="inner-period-kept"),
        param("Worker: Design Notes", "Worker: Design Notes", id="inner-colon-kept"),
        param("Backup finished. Two files were skipped.", "Backup finished", id="first-sentence-only"),
        param("Is it ready? Yes, it is.", "Is it ready?", id="first-question-only"),
        param("\u79fb\u884c\u3057\u307e\u3059\u3002\u5348\u524d9\u6642", "\u79fb\u884c\u3057\u307e\u3059",
              id="cjk-first-sentence"),
    ],
)
def test_clean_title_examples(raw: str, expected: str) -> None:
    assert worker.clean_title(raw) == expected


LONG_WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega"
)


@pytest.mark.parametrize(
    "raw",
    [
        param(LONG_WORDS, id="greek-words"),
        param(LONG_WORDS.replace("theta ", "theta. "), id="period-inside"),
        param("# " + LONG_WORDS + ".", id="markdown-and-period"),
    ],
)
def test_clean_title_long_output_is_cut_at_a_word(raw: str) -> None:
    title = worker.clean_title(raw)
    assert 0 < len(title) <= worker.TITLE_MAX_CHARS == 80
    assert not title.endswith((".", "\u2026", " "))
    source = worker.plain_lines(raw)[0]
    # A prefix of the source that ends where a word ends.
    assert source.startswith(title)
    assert source[len(title)] in " ."


@pytest.mark.parametrize(
    "raw, expected",
    [
        param("a" * 200, "a" * 80, id="no-spaces"),
        # The only space is in the first half of the limit: no word boundary is "reasonably near".
        param("Quarterly report " + "x" * 100, "Quarterly report " + "x" * 63, id="long-word-after-short-start"),
    ],
)
def test_clean_title_without_a_near_space_is_cut_hard(raw: str, expected: str) -> None:
    assert worker.clean_title(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        param("", id="empty"),
        param("   \n\t  \n", id="whitespace-only"),
        param('""', id="only-quotes"),
        param("\u00ab\u00bb", id="only-guillemets"),
        param("...", id="only-dots"),
        param("**  **", id="only-markdown"),
        param("```\n```", id="empty-code-fence"),
        param("Sure!", id="only-interjection"),
        param("Title:", id="only-label"),
        param("Sure! Here is a title:", id="only-preamble"),
        param("<think>The user wants a title about", id="think-unclosed"),
        param("<think>reasoning</think>", id="think-closed-nothing-after"),
        param("<think>reasoning</think>\n\n  \n", id="think-then-whitespace"),
    ],
)
def test_clean_output_title_empty_raises(raw: str) -> None:
    with pytest.raises(worker.EmptyOutput) as info:
        worker.clean_output("title", raw)
    assert info.value.type == "empty_output"
    assert info.value.status == 502


# ==================================================================================================
# 1. Output clean-up: summary
# ==================================================================================================

EXPECTED_SUMMARY = "The worker is fast. It runs on the NPU."

SUMMARY_CASES = [
    param("The worker is fast. It runs on the NPU.", id="plain"),
    param("The worker is fast.\nIt runs on the NPU.", id="two-lines"),
    param("The worker is fast.\n\n\nIt runs on the NPU.\n", id="blank-lines"),
    param("The   worker is\tfast. It runs on the NPU.", id="inner-whitespace"),
    param("Here's a concise summary of the text:\n\nThe worker is fast. It runs on the NPU.", id="preamble-line"),
    param("Sure! Here is a summary: The worker is fast. It runs on the NPU.", id="preamble-same-line"),
    param("Okay.\nThe worker is fast. It runs on the NPU.", id="interjection-line"),
    param("Summary: The worker is fast. It runs on the NPU.", id="label"),
    param("Summary:\nThe worker is fast. It runs on the NPU.", id="label-line"),
    param("**Summary:** The worker is fast. It runs on the NPU.", id="bold-label"),
    param("The **worker** is fast. It runs on the __NPU__.", id="inline-emphasis"),
    param("- The worker is fast.\n- It runs on the NPU.", id="bullets"),
    param("1. The worker is fast.\n2. It runs on the NPU.", id="numbered-list"),
    param("```\nThe worker is fast. It runs on the NPU.\n```", id="code-fence"),
    param("<think>\nLet me summarize.\n</think>\nThe worker is fast. It runs on the NPU.", id="think-closed"),
    param("The worker is fast. It runs on the NPU. The worker is fast.", id="repeated-sentence"),
    param("The worker is fast. It runs on the NPU. It runs on the", id="trailing-fragment"),
    param("The worker is fast. It runs on the NPU. It runs on the NPU. It runs on the NPU.", id="runaway-sentence"),
]


@pytest.mark.parametrize("raw", SUMMARY_CASES)
def test_clean_summary_removes_decoration(raw: str) -> None:
    assert worker.clean_summary(raw) == EXPECTED_SUMMARY
    assert worker.clean_output("summary", raw).text == EXPECTED_SUMMARY


@pytest.mark.parametrize(
    "raw, expected",
    [
        param(
            "the worker is fast. the worker is fast. the worker is fast.",
            "the worker is fast.",
            id="runaway-repetition",
        ),
        param("NPU NPU NPU NPU", "NPU", id="runaway-word"),
        param("The worker is fast and", "The worker is fast and", id="lone-fragment-kept"),
        param("Is it fast? Yes! It is", "Is it fast? Yes!", id="question-and-exclamation-end-sentences"),
        param(
            "One. Two. Three. Four. Five. Six. Seven.",
            "One. Two. Three. Four. Five.",
            id="more-than-five-sentences",
        ),
        param(
            "One. Two. Three. Four. Five. Six. Seven and",
            "One. Two. Three. Four. Five.",
            id="more-than-five-with-fragment",
        ),
    ],
)
def test_clean_summary_examples(raw: str, expected: str) -> None:
    assert worker.clean_summary(raw) == expected


def test_clean_summary_long_output_has_at_most_five_sentences_on_one_line() -> None:
    raw = "\n".join(f"Sentence number {i} is about the worker." for i in range(1, 21)) + "\nAnd then the model was cut"
    summary = worker.clean_summary(raw)
    assert "\n" not in summary
    sentences = re.split(r"(?<=[.!?])\s+", summary)
    assert len(sentences) == worker.SUMMARY_MAX_SENTENCES == 5
    assert sentences[0] == "Sentence number 1 is about the worker."
    assert summary.endswith("Sentence number 5 is about the worker.")


@pytest.mark.parametrize(
    "raw",
    [
        param("", id="empty"),
        param(" \n \t ", id="whitespace-only"),
        param("<think>Let me think about the", id="think-unclosed"),
        param("<think>x</think>", id="think-closed-nothing-after"),
        param("Here's a concise summary of the text:", id="only-preamble"),
        param("```\n```", id="empty-code-fence"),
    ],
)
def test_clean_output_summary_empty_raises(raw: str) -> None:
    with pytest.raises(worker.EmptyOutput):
        worker.clean_output("summary", raw)


# ==================================================================================================
# 1. Output clean-up: notification
# ==================================================================================================

EXPECTED_NOTIFICATION = "Backup done at 03:12: 1,204 new files, 2 skipped."

NOTIFICATION_CASES = [
    param("Backup done at 03:12: 1,204 new files, 2 skipped.", id="plain"),
    param('"Backup done at 03:12: 1,204 new files, 2 skipped."', id="straight-quotes"),
    param("\u201cBackup done at 03:12: 1,204 new files, 2 skipped.\u201d", id="curly-quotes"),
    param("\u00abBackup done at 03:12: 1,204 new files, 2 skipped.\u00bb", id="guillemets"),
    param("Notification: Backup done at 03:12: 1,204 new files, 2 skipped.", id="label"),
    param("**Notification:** Backup done at 03:12: 1,204 new files, 2 skipped.", id="bold-label"),
    param("- **Backup done** at 03:12: 1,204 new files, 2 skipped.", id="bullet-and-bold"),
    param("## Backup done at 03:12: 1,204 new files, 2 skipped.", id="heading"),
    param("Sure! Here is the notification:\nBackup done at 03:12: 1,204 new files, 2 skipped.", id="preamble-line"),
    param("Here is a notification: Backup done at 03:12: 1,204 new files, 2 skipped.", id="preamble-same-line"),
    param("<think>short</think>\nBackup done at 03:12: 1,204 new files, 2 skipped.", id="think-closed"),
    param("Backup done at 03:12:\n1,204 new files,\n2 skipped.", id="multiple-lines-joined"),
    param("```\nBackup done at 03:12: 1,204 new files, 2 skipped.\n```", id="code-fence"),
]


@pytest.mark.parametrize("raw", NOTIFICATION_CASES)
def test_clean_notification_removes_decoration(raw: str) -> None:
    assert worker.clean_notification(raw) == EXPECTED_NOTIFICATION
    assert worker.clean_output("notification", raw).text == EXPECTED_NOTIFICATION


@pytest.mark.parametrize(
    "raw, expected",
    [
        param("NPU NPU NPU NPU", "NPU", id="runaway-word"),
        param("Backup done. Backup done. Backup done. Backup done.", "Backup done.", id="runaway-sentence"),
        param("Is the backup done?", "Is the backup done?", id="question-kept"),
    ],
)
def test_clean_notification_examples(raw: str, expected: str) -> None:
    assert worker.clean_notification(raw) == expected


DISTINCT_WORDS = " ".join(f"word{i:03d}" for i in range(100))  # no repetition to collapse


def text_of_length(length: int) -> str:
    text = DISTINCT_WORDS[: length - 1].rstrip() + "z"
    return text + "z" * (length - len(text))


@pytest.mark.parametrize("length", [1, 139, 140], ids=lambda n: f"{n}-chars")
def test_clean_notification_up_to_limit_is_unchanged(length: int) -> None:
    text = text_of_length(length)
    assert len(text) == length
    assert worker.clean_notification(text) == text


@pytest.mark.parametrize(
    "raw, at_word",
    [
        param(LONG_WORDS + " " + LONG_WORDS.upper(), True, id="words"),
        param(text_of_length(141), True, id="141-chars"),
        param(DISTINCT_WORDS, True, id="far-over"),
        # Only the first answer line is the notification; the lines after it are never joined on.
        param(LONG_WORDS + " " + LONG_WORDS.upper() + "\n" + DISTINCT_WORDS.replace(" ", "\n"), True, id="many-lines"),
        # No space in the second half of the limit: a hard cut (CONTRACT: "cut at a word" is best effort).
        param("Backup " + "x" * 200, False, id="one-huge-word"),
    ],
)
def test_clean_notification_long_output_is_cut_with_ellipsis(raw: str, at_word: bool) -> None:
    text = worker.clean_notification(raw)
    assert len(text) <= worker.NOTIFICATION_MAX_CHARS == 140
    assert text.endswith("\u2026")
    assert "\n" not in text
    body = text[:-1]
    source = worker.answer_lines(raw)[0]
    assert source.startswith(body)
    if at_word:
        assert source[len(body)] == " "
        assert len(body) > 70
    else:
        assert body == source[:139]


@pytest.mark.parametrize(
    "raw",
    [
        param("", id="empty"),
        param("\n\n   ", id="whitespace-only"),
        param('""', id="only-quotes"),
        param("\u201c\u201d", id="only-curly-quotes"),
        param("<think>unclosed reasoning", id="think-unclosed"),
        param("Notification:", id="only-label"),
    ],
)
def test_clean_output_notification_empty_raises(raw: str) -> None:
    with pytest.raises(worker.EmptyOutput):
        worker.clean_output("notification", raw)


# ==================================================================================================
# 1. Output clean-up: cases that once were bugs
# ==================================================================================================


@pytest.mark.parametrize(
    "job, raw",
    [
        param("title", "Set DNS to 1.1.1.1", id="title-ip-address"),
        param("title", "Upgrade to version 2.2.2", id="title-version"),
        param("notification", "Backup done at 00:00:00 today", id="notification-time"),
        param("summary", "The DNS server is 1.1.1.1.", id="summary-ip-address"),
    ],
)
def test_numbers_are_not_runaway_repetition(job: str, raw: str) -> None:
    number = re.search(r"\d+(?:[.:]\d+)+", raw).group(0)
    assert number in worker.clean_output(job, raw).text


@pytest.mark.parametrize(
    "job, raw",
    [
        param("title", "Great Barrier Reef: Coral Bleaching Worsens", id="title"),
        param("notification", "Great Barrier Reef: coral bleaching alert issued.", id="notification"),
    ],
)
def test_content_starting_with_a_preamble_word_is_kept(job: str, raw: str) -> None:
    assert worker.clean_output(job, raw).text.startswith("Great Barrier Reef")


@pytest.mark.parametrize(
    "raw",
    [
        param("The user wants a title.\n</think>\n\nNPU Worker Prototype", id="reasoning-then-close"),
        param("</think>\n\nNPU Worker Prototype", id="bare-close-tag"),
    ],
)
def test_orphan_think_close_tag(raw: str) -> None:
    assert worker.clean_title(raw) == EXPECTED_TITLE


@pytest.mark.parametrize(
    "job, raw, expected",
    [
        param("title", "# Title\nNPU Worker Prototype", EXPECTED_TITLE, id="title"),
        param("summary", "## Summary\nThe worker is fast. It runs on the NPU.", EXPECTED_SUMMARY, id="summary"),
        param("notification", "### Notification\nBackup done.", "Backup done.", id="notification"),
    ],
)
def test_heading_label_is_removed(job: str, raw: str, expected: str) -> None:
    assert worker.clean_output(job, raw).text == expected


@pytest.mark.parametrize(
    "raw",
    [
        param('"The worker is fast. It runs on the NPU."', id="straight"),
        param("\u201cThe worker is fast. It runs on the NPU.\u201d", id="curly"),
        param("\u00abThe worker is fast. It runs on the NPU.\u00bb", id="guillemets"),
        param('""', id="only-quotes"),
    ],
)
def test_summary_surrounding_quotes(raw: str) -> None:
    try:
        text = worker.clean_output("summary", raw).text
    except worker.EmptyOutput:
        text = ""
    if raw == '""':
        assert text == ""
    else:
        assert text == EXPECTED_SUMMARY


@pytest.mark.parametrize("job", ["summary", "notification"])
@pytest.mark.parametrize("raw", ["...", "\u2026"], ids=["dots", "ellipsis-char"])
def test_placeholder_only_output_is_empty(job: str, raw: str) -> None:
    with pytest.raises(worker.EmptyOutput):
        worker.clean_output(job, raw)


@pytest.mark.parametrize(
    "raw, expected",
    [
        param('The worker is "fast." It runs on the', 'The worker is "fast."', id="straight-quote"),
        param("The worker is \u201cfast.\u201d It runs on the", "The worker is \u201cfast.\u201d", id="curly-quote"),
        param("The worker is fast (really.) It runs on the", "The worker is fast (really.)", id="parenthesis"),
    ],
)
def test_summary_fragment_after_quoted_sentence_end(raw: str, expected: str) -> None:
    assert worker.clean_summary(raw) == expected


def test_summary_horizontal_rule() -> None:
    raw = "The worker is fast.\n\n---\n\nIt runs on the NPU."
    assert worker.clean_summary(raw) == EXPECTED_SUMMARY


# ==================================================================================================
# 2. parse_memory_candidates
# ==================================================================================================

TEA = {"text": "Prefers tea over coffee"}
LISBON = {"text": "Lives in Lisbon since last spring"}

MEMORY_CASES = [
    param('{"candidates": [{"text": "Prefers tea over coffee"}]}', [TEA], True, id="object"),
    param('{"candidates": []}', [], True, id="object-empty-list"),
    param('[{"text": "Prefers tea over coffee"}]', [TEA], True, id="bare-list"),
    param('["Prefers tea over coffee", "Lives in Lisbon since last spring"]', [TEA, LISBON], True,
          id="list-of-strings"),
    param(
        '```json\n{"candidates": [{"text": "Prefers tea over coffee"}]}\n```',
        [TEA],
        True,
        id="code-fenced",
    ),
    param(
        ('Here are the facts worth remembering:\n{"candidates": [{"text": "Prefers tea over coffee"}]}\n'
         'Hope this helps!'),
        [TEA],
        True,
        id="text-around-json",
    ),
    param(
        '<think>{"candidates": [{"text": "wrong"}]}</think>{"candidates": [{"text": "Prefers tea over coffee"}]}',
        [TEA],
        True,
        id="think-block-with-json-inside",
    ),
    param('{"candidates": [{"text": "  Prefers   tea\\nover coffee "}]}', [TEA], True, id="whitespace-normalised"),
    param(
        ('{"candidates": [{"fact": "x"}, {"text": 5}, {"text": null}, 42, null, [], '
         '{"text": "Prefers tea over coffee"}]}'),
        [TEA],
        True,
        id="items-without-text-skipped",
    ),
    param(
        '{"candidates": [{"text": "..."}, {"text": "\u2026"}, {"text": ""}, {"text": "   "}, {"text": "-"}, '
        '{"text": "Prefers tea over coffee"}]}',
        [TEA],
        True,
        id="placeholders-dropped",
    ),
    param(
        '{"candidates": [{"text": "Prefers tea over coffee"}, {"text": "PREFERS TEA OVER COFFEE"}, '
        '"prefers tea over coffee", {"text": "Lives in Lisbon since last spring"}]}',
        [TEA, LISBON],
        True,
        id="duplicates-case-insensitive",
    ),
    param("I could not find any facts.", [], False, id="no-json"),
    param("", [], False, id="empty"),
    param("{candidates: [Prefers tea]}", [], False, id="invalid-json"),
    param("{'candidates': [{'text': 'Prefers tea'}]}", [], False, id="single-quoted-json"),
    param('{"candidates": [{"text": "Lives in Lis', [], False, id="truncated-mid-string"),
    # Cut off by the token budget: the items complete before the cut are kept, json_valid says the cut.
    param('{"candidates": [{"text": "Prefers tea over coffee"}, ', [TEA], False, id="truncated-mid-array"),
    param('{"candidates": [{"text": "Prefers tea over coffee"}]', [TEA], False, id="truncated-before-last-brace"),
    param('{"candidates":[{"text":"Prefers tea over coffee"},{"text":"Lives in Lis', [TEA], False,
          id="truncated-compact"),
    param('[{"text": "Prefers tea over coffee"}, {"text": "Lives in Lisbon since last spring"}', [TEA, LISBON], False,
          id="truncated-bare-list"),
    param('{"candidates": [{"text": "Prefers tea over coffee"} {"text": "Lives in Lisbon since last spring"}',
          [TEA, LISBON], False, id="truncated-missing-comma"),
    param('{"other": 1, "candidates": [{"text": "Prefers tea over coffee"}', [], False, id="truncated-other-key-first"),
    param('{"candidates": "x"}', [], False, id="candidates-is-string"),
    param('{"candidates": {"text": "x"}}', [], False, id="candidates-is-object"),
    param('{"facts": [{"text": "Prefers tea"}]}', [], False, id="no-candidates-key"),
    param("[" * 100_000, [], False, id="deep-open-brackets-100k"),
    param("[" * 100_000 + "]" * 100_000, [], False, id="deep-closed-brackets-100k"),
    param('{"candidates":' * 100_000, [], False, id="deep-objects-100k"),
]


@pytest.mark.parametrize("raw, candidates, json_valid", MEMORY_CASES)
def test_parse_memory_candidates(raw: str, candidates: list[dict[str, str]], json_valid: bool) -> None:
    assert worker.parse_memory_candidates(raw) == (candidates, json_valid)


@pytest.mark.parametrize("raw, candidates, json_valid", MEMORY_CASES)
def test_clean_output_memory_never_raises(raw: str, candidates: list[dict[str, str]], json_valid: bool) -> None:
    output = worker.clean_output("memory_candidate", raw)
    assert output.json_valid is json_valid
    assert output.candidates == candidates
    assert output.text == raw.strip()


def test_parse_memory_candidates_keeps_at_most_five() -> None:
    raw = '{"candidates": [' + ", ".join(f'{{"text": "Fact number {i}"}}' for i in range(1, 9)) + "]}"
    candidates, valid = worker.parse_memory_candidates(raw)
    assert valid is True
    assert candidates == [{"text": f"Fact number {i}"} for i in range(1, 6)]


def test_parse_memory_candidates_duplicates_do_not_use_up_the_five() -> None:
    texts = ["Fact one", "FACT ONE", "fact one", "Fact two", "Fact three", "Fact four", "Fact five", "Fact six"]
    candidates, valid = worker.parse_memory_candidates(str(texts).replace("'", '"'))
    assert valid is True
    assert [c["text"] for c in candidates] == ["Fact one", "Fact two", "Fact three", "Fact four", "Fact five"]


@pytest.mark.parametrize(
    "fact",
    [
        param(LONG_WORDS * 5, id="words"),
        param("x" * 1000, id="one-long-word"),
        param((LONG_WORDS + ". ") * 3, id="sentences"),
    ],
)
def test_parse_memory_candidates_cuts_overlong_text(fact: str) -> None:
    candidates, valid = worker.parse_memory_candidates('{"candidates": [{"text": "' + fact + '"}]}')
    assert valid is True
    [candidate] = candidates
    assert len(fact) > worker.MEMORY_CANDIDATE_MAX_CHARS
    assert 0 < len(candidate["text"]) <= worker.MEMORY_CANDIDATE_MAX_CHARS == 120
    assert candidate["text"].endswith("\u2026")
    assert " ".join(fact.split()).startswith(candidate["text"][:-1])


def test_memory_candidates_are_valid_unicode() -> None:
    """A lone surrogate (valid JSON, not sendable as UTF-8) drops its fact; the others stay."""
    candidates, valid = worker.parse_memory_candidates(
        '{"candidates": [{"text": "Prefers tea \\ud800 over coffee"}, {"text": "Works from Lisbon"}]}'
    )
    assert (candidates, valid) == ([{"text": "Works from Lisbon"}], True)
    for candidate in candidates:
        candidate["text"].encode("utf-8")


# ==================================================================================================
# 3. Validation: parse_json_body
# ==================================================================================================

M = MARKER.encode()


@pytest.mark.parametrize(
    "body",
    [
        param(b'{"input": "' + M + b'\xff\xfe"}', id="invalid-utf8"),
        param(b"\xc3\x28" + M, id="invalid-utf8-sequence"),
        param(b'{"input": "' + M + b'\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
        param(b"", id="empty"),
        param(M + b" is not json", id="not-json"),
        param(b'{"input": "' + M + b'"', id="truncated"),
        param(b'{"input": "' + M + b'"} trailing', id="trailing-garbage"),
        param(b"\xef\xbb\xbf" + b'{"input": "' + M + b'"}', id="utf8-bom"),
        param(b'{"input": "' + M + b'", "max_new_tokens": NaN}', id="nan"),
        param(b'{"input": "' + M + b'", "max_new_tokens": Infinity}', id="infinity"),
        param(b'{"input": "' + M + b'", "max_new_tokens": -Infinity}', id="minus-infinity"),
        param(b'["' + M + b'"]', id="top-level-list"),
        param(b'"' + M + b'"', id="top-level-string"),
        param(b"42", id="top-level-number"),
        param(b"null", id="top-level-null"),
        param(b"true", id="top-level-bool"),
        param(b'{"a": "' + M + b'", "b": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-100k-lists"),
        param(b'{"a":' * 100_000 + b'"' + M + b'"' + b"}" * 100_000, id="nested-100k-objects"),
        param(b"[" * 100_000 + M, id="nested-100k-unclosed"),
        param(b'{"input": ' + b"1" * 5000 + b', "x": "' + M + b'"}', id="integer-over-4300-digits"),
    ],
)
def test_parse_json_body_rejects(body: bytes) -> None:
    with pytest.raises(worker.InvalidJson) as info:
        worker.parse_json_body(body)
    assert info.value.status == 400
    assert info.value.type == "invalid_json"
    assert info.value.exit_code == 2
    assert MARKER not in info.value.message
    assert MARKER not in str(info.value)


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body, expected",
    [
        param(b'{"job": "title", "input": "hi"}', {"job": "title", "input": "hi"}, id="object"),
        param(b"{}", {}, id="empty-object"),
        param(' {"input": "caf\u00e9 \u2603"} \n'.encode(), {"input": "caf\u00e9 \u2603"}, id="utf8-and-whitespace"),
        param(b'{"a": ' + b"[" * 50 + b"]" * 50 + b"}", {"a": nested_lists(50)}, id="nested-50"),
    ],
)
def test_parse_json_body_accepts(body: bytes, expected: dict[str, Any]) -> None:
    assert worker.parse_json_body(body) == expected


# ==================================================================================================
# 3. Validation: validate_job_request
# ==================================================================================================

DEFAULT_LIMITS = worker.Limits()


@pytest.mark.parametrize(
    "body, job",
    [
        param({"input": "hi"}, None, id="job-missing"),
        param({"job": None, "input": "hi"}, None, id="job-null"),
        param({"job": MARKER, "input": "hi"}, None, id="job-unknown"),
        param({"job": "Title", "input": "hi"}, None, id="job-wrong-case"),
        param({"job": ["title"], "input": "hi"}, None, id="job-list"),
        param({"job": 1, "input": "hi"}, None, id="job-number"),
        param({"job": "title", "input": "hi", MARKER: 1}, None, id="unknown-field"),
        param({"job": "title", "input": "hi", "Input": MARKER}, None, id="unknown-field-case"),
        param({"input": "hi", "job": "title"}, "notification", id="job-field-on-fixed-endpoint"),
        param({"input": "hi", MARKER: 1}, "memory_candidate", id="unknown-field-fixed-job"),
        param({"job": "title"}, None, id="input-missing"),
        param({}, "title", id="input-missing-fixed-job"),
        param({"job": "title", "input": None}, None, id="input-null"),
        param({"job": "title", "input": 5}, None, id="input-number"),
        param({"job": "title", "input": True}, None, id="input-bool"),
        param({"job": "title", "input": [MARKER]}, None, id="input-list"),
        param({"job": "title", "input": {"text": MARKER}}, None, id="input-object"),
        param({"job": "title", "input": b"bytes"}, None, id="input-bytes"),
        param({"job": "title", "input": ""}, None, id="input-empty"),
        param({"job": "title", "input": " \n\t\u3000 "}, None, id="input-blank"),
        param({"job": "title", "input": MARKER + "\x00tail"}, None, id="input-nul"),
        param({"job": "title", "input": MARKER + "\ud800"}, None, id="input-lone-surrogate"),
        param({"input": MARKER + "\udfff"}, "summary", id="input-lone-low-surrogate-fixed-job"),
    ],
)
def test_validate_job_request_invalid(body: dict[str, Any], job: str | None) -> None:
    with pytest.raises(worker.InvalidRequest) as info:
        worker.validate_job_request(body, DEFAULT_LIMITS, job=job)
    assert type(info.value) is worker.InvalidRequest
    assert info.value.status == 400
    assert info.value.type == "invalid_request"
    assert MARKER not in info.value.message


def test_validate_job_request_unknown_field_reports_a_count() -> None:
    body = {"job": "title", "input": "hi", MARKER + "a": 1, MARKER + "b": 2}
    with pytest.raises(worker.InvalidRequest) as info:
        worker.validate_job_request(body, DEFAULT_LIMITS)
    assert "2" in info.value.message
    assert MARKER not in info.value.message


def test_validate_job_request_lone_surrogate_through_json() -> None:
    body = worker.parse_json_body(b'{"job": "title", "input": "abc \\ud800 def"}')
    with pytest.raises(worker.InvalidRequest):
        worker.validate_job_request(body, DEFAULT_LIMITS)


@pytest.mark.parametrize(
    "limits, length",
    [
        param(worker.Limits(), 6001, id="default-6000"),
        param(worker.Limits(), 60_000, id="default-far-over"),
        param(worker.Limits(max_input_chars=10), 11, id="custom-10"),
    ],
)
@pytest.mark.parametrize("job", [None, "memory_candidate"], ids=["generate", "fixed-job"])
def test_validate_job_request_input_too_long(limits: worker.Limits, length: int, job: str | None) -> None:
    text = (MARKER + " ") * (length // len(MARKER + " ") + 1)
    text = text[:length]
    body = {"input": text} if job else {"job": "title", "input": text}
    with pytest.raises(worker.InputTooLong) as info:
        worker.validate_job_request(body, limits, job=job)
    assert info.value.status == 413
    assert info.value.type == "input_too_long"
    assert str(length) in info.value.message
    assert str(limits.max_input_chars) in info.value.message
    assert MARKER not in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        param("x" * 6000, id="exactly-6000"),
        param("\u2603" * 6000, id="6000-code-points-18000-bytes"),
        param("a", id="one-char"),
        param("  padded  ", id="padded"),
        param("line one\nline two\ttab", id="control-whitespace"),
    ],
)
def test_validate_job_request_accepts_input(text: str) -> None:
    request = worker.validate_job_request({"job": "summary", "input": text}, DEFAULT_LIMITS)
    assert request == worker.JobRequest(job="summary", input_text=text, max_new_tokens=None)


@pytest.mark.parametrize(
    "value",
    [
        param(True, id="true"),
        param(False, id="false"),
        param(24.0, id="float-integral"),
        param(1.5, id="float"),
        param("24", id="string"),
        param(MARKER, id="string-marker"),
        param([24], id="list"),
        param(0, id="zero"),
        param(-1, id="negative"),
        param(65, id="title-max-plus-one"),
        param(257, id="over-global-max"),
        param(10**30, id="huge"),
    ],
)
def test_validate_job_request_bad_max_new_tokens(value: Any) -> None:
    with pytest.raises(worker.InvalidRequest) as info:
        worker.validate_job_request({"job": "title", "input": "hi", "max_new_tokens": value}, DEFAULT_LIMITS)
    assert "max_new_tokens" in info.value.message
    assert MARKER not in info.value.message


@pytest.mark.parametrize("job", list(JOB_DEFAULTS))
@pytest.mark.parametrize("fixed", [False, True], ids=["generate", "fixed-job"])
def test_validate_job_request_max_new_tokens_range(job: str, fixed: bool) -> None:
    _, maximum = JOB_DEFAULTS[job]

    def validate(value: Any) -> worker.JobRequest:
        body: dict[str, Any] = {"input": "hi", "max_new_tokens": value}
        if fixed:
            return worker.validate_job_request(body, DEFAULT_LIMITS, job=job)
        return worker.validate_job_request({**body, "job": job}, DEFAULT_LIMITS)

    assert validate(maximum).max_new_tokens == maximum
    assert validate(1).max_new_tokens == 1
    with pytest.raises(worker.InvalidRequest):
        validate(None)  # null is a wrong type, not "use the default"
    if fixed:
        assert worker.validate_job_request({"input": "hi"}, DEFAULT_LIMITS, job=job).max_new_tokens is None
    with pytest.raises(worker.InvalidRequest) as info:
        validate(maximum + 1)
    assert str(maximum) in info.value.message


# Expected (default, maximum) per job for a --max-new-tokens-limit, written out by hand.
TOKEN_LIMIT_TABLE = {
    256: {"title": (40, 64), "summary": (192, 256), "notification": (64, 96), "memory_candidate": (200, 256)},
    1000: {"title": (40, 64), "summary": (192, 256), "notification": (64, 96), "memory_candidate": (200, 256)},
    100: {"title": (40, 64), "summary": (100, 100), "notification": (64, 96), "memory_candidate": (100, 100)},
    50: {"title": (40, 50), "summary": (50, 50), "notification": (50, 50), "memory_candidate": (50, 50)},
    1: {"title": (1, 1), "summary": (1, 1), "notification": (1, 1), "memory_candidate": (1, 1)},
}


@pytest.mark.parametrize("limit", list(TOKEN_LIMIT_TABLE), ids=lambda n: f"limit-{n}")
@pytest.mark.parametrize("job", list(JOB_DEFAULTS))
def test_job_maxima_follow_max_new_tokens_limit(limit: int, job: str) -> None:
    limits = worker.Limits(max_new_tokens=limit)
    default, maximum = TOKEN_LIMIT_TABLE[limit][job]
    assert worker.job_token_limits(worker.JOBS[job], limits) == (default, maximum)
    body = {"job": job, "input": "hi"}
    assert worker.validate_job_request({**body, "max_new_tokens": maximum}, limits).max_new_tokens == maximum
    with pytest.raises(worker.InvalidRequest):
        worker.validate_job_request({**body, "max_new_tokens": maximum + 1}, limits)


def test_jobs_table_matches_contract() -> None:
    rows = table_rows(contract_section("Jobs"))
    documented = {}
    for cells in rows:
        name = cells[0].strip("`")
        default, maximum = (int(part) for part in cells[1].split("/"))
        documented[name] = (default, maximum)
    assert documented == JOB_DEFAULTS
    assert set(worker.JOBS) == set(documented)
    for name, (default, maximum) in documented.items():
        assert worker.job_token_limits(worker.JOBS[name], worker.Limits()) == (default, maximum)


def test_documented_limit_defaults() -> None:
    limits = worker.Limits()
    assert limits.max_input_chars == 6000
    assert limits.max_new_tokens == 256
    assert limits.max_prompt_tokens == 1024
    assert limits.min_response_tokens == 256
    assert limits.context_tokens == 1280
    assert limits.max_body_bytes == 12 * 6000 + 4096 == 76096
    assert worker.DEFAULT_QUEUE_DEPTH == 8
    assert worker.DEFAULT_LOCK_TIMEOUT_S == 60
    assert (worker.HEAD_DEADLINE_S, worker.BODY_DEADLINE_S, worker.IDLE_TIMEOUT_S) == (5, 10, 10)
    assert (worker.DEFAULT_MAX_CONNECTIONS, worker.HEALTH_SLOTS, worker.MAX_PENDING_CONNECTIONS) == (64, 8, 256)
    assert max(job.max_new_tokens for job in worker.JOBS.values()) == 256


# ==================================================================================================
# 4. plan_max_new_tokens
# ==================================================================================================


@pytest.mark.parametrize(
    "limits, prompt, requested, expected",
    [
        param(worker.Limits(), 50, 24, 24, id="short-prompt"),
        param(worker.Limits(), 1, 256, 256, id="one-token-prompt"),
        param(worker.Limits(), 1024, 256, 256, id="prompt-at-limit"),
        param(worker.Limits(), 1024, 1, 1, id="prompt-at-limit-one-token"),
        param(worker.Limits(max_prompt_tokens=100, min_response_tokens=10), 95, 50, 15, id="clamped-to-room"),
        param(worker.Limits(max_prompt_tokens=100, min_response_tokens=10), 100, 50, 10, id="clamped-at-limit"),
        param(worker.Limits(max_prompt_tokens=100, min_response_tokens=10), 60, 50, 50, id="fits-room"),
        param(worker.Limits(max_prompt_tokens=100, min_response_tokens=10), 61, 50, 49, id="one-over-room"),
    ],
)
def test_plan_max_new_tokens(limits: worker.Limits, prompt: int, requested: int, expected: int) -> None:
    assert worker.plan_max_new_tokens(prompt, requested, limits) == expected


@pytest.mark.parametrize(
    "limits, prompt",
    [
        param(worker.Limits(), 1025, id="default-plus-one"),
        param(worker.Limits(), 10_000, id="default-far-over"),
        param(worker.Limits(max_prompt_tokens=100, min_response_tokens=10), 101, id="custom-plus-one"),
    ],
)
def test_prompt_too_long_says_by_how_much_and_what_would_fit(limits: worker.Limits, prompt: int) -> None:
    error = worker.prompt_too_long(prompt, 40, 5000, limits)
    assert (error.status, error.type) == (413, "prompt_too_long")
    over = prompt - limits.max_prompt_tokens
    fits = 5000 * (limits.max_prompt_tokens - 40) // (prompt - 40)
    assert error.message == (
        f"prompt has {prompt} tokens; the limit is {limits.max_prompt_tokens}: the input is {over} tokens over, "
        f'about {fits} of its 5000 characters would fit (or send "truncate": true)'
    )
    assert error.details == {"prompt_tokens": prompt, "max_prompt_tokens": limits.max_prompt_tokens,
                             "over_tokens": over, "fits_chars_estimate": fits}
    body = worker.error_body(error, "r1")
    assert body["error"]["over_tokens"] == over and body["error"]["type"] == "prompt_too_long"


@pytest.mark.parametrize("kept, expected", [
    (10, "abcdefghij"), (99, "abcdefghij"), (4, "ab\n[\u2026]\nij"), (3, "ab\n[\u2026]\nj"), (0, "\n[\u2026]\n"),
])
def test_shorten_middle_keeps_the_start_and_the_end(kept: int, expected: str) -> None:
    assert worker.shorten_middle("abcdefghij", kept) == expected


def test_fit_input_finds_the_longest_input_that_fits_by_the_counter_it_is_given() -> None:
    text = "".join(chr(ord("a") + index % 26) for index in range(6000))
    calls: list[str] = []

    def count(candidate: str) -> int:  # a prompt of 50 tokens plus one token per 3 characters
        calls.append(candidate)
        return 50 + len(candidate) // 3

    fitted = worker.fit_input(text, count, 1024)
    assert fitted is not None and count(fitted) <= 1024
    kept = len(fitted) - len(worker.TRUNCATION_MARKER)
    assert count(worker.shorten_middle(text, kept + 1)) > 1024  # one more character would not fit
    assert fitted.startswith(text[: kept - kept // 2]) and fitted.endswith(text[-(kept // 2):])
    assert len(calls) < 20  # bisection, not a scan


def test_fit_input_gives_none_when_not_even_the_marker_fits() -> None:
    assert worker.fit_input("x" * 100, lambda candidate: 2000, 1024) is None


def test_plan_max_new_tokens_never_clamps_with_defaults() -> None:
    limits = worker.Limits()
    maxima = {worker.job_token_limits(job, limits)[1] for job in worker.JOBS.values()} | {256}
    for requested in sorted(maxima):
        for prompt in range(1, limits.max_prompt_tokens + 1):
            assert worker.plan_max_new_tokens(prompt, requested, limits) == requested, (prompt, requested)


# ==================================================================================================
# 5. Errors: error_body, types, status and exit codes against CONTRACT.md
# ==================================================================================================


def all_error_classes() -> list[type[worker.WorkerError]]:
    found: list[type[worker.WorkerError]] = [worker.WorkerError]
    index = 0
    while index < len(found):
        found.extend(sub for sub in found[index].__subclasses__() if sub not in found)
        index += 1
    return [cls for cls in found if cls is not worker.ClientError]  # a grouping, with no type of its own


def test_error_body_shape() -> None:
    exc = worker.InputTooLong("'input' has 7000 characters; the limit is 6000")
    assert worker.error_body(exc, "5b6c7d8e9f0a4b1c2d3e4f5a6b7c8d9e") == {
        "error": {"type": "input_too_long", "message": "'input' has 7000 characters; the limit is 6000"},
        "request_id": "5b6c7d8e9f0a4b1c2d3e4f5a6b7c8d9e",
    }


def test_error_body_with_result() -> None:
    result = {"text": "raw", "npu_proof": "failed", "npu_busy_delta_us": 0}
    exc = worker.NpuProofFailed("the NPU busy counter did not advance", result=result)
    body = worker.error_body(exc, "rid")
    assert set(body) == {"error", "result", "request_id"}
    assert body["error"] == {"type": "npu_proof_failed", "message": "the NPU busy counter did not advance"}
    assert body["result"] == result


@pytest.mark.parametrize("status", sorted(worker.ProtocolError.TYPES))
def test_error_body_protocol_error(status: int) -> None:
    body = worker.error_body(worker.ProtocolError(status), "rid")
    assert body == {
        "error": {"type": worker.ProtocolError.TYPES[status], "message": f"HTTP error {status}"},
        "request_id": "rid",
    }


def test_error_types_are_distinct() -> None:
    classes = [cls for cls in all_error_classes() if cls is not worker.ProtocolError]
    assert len(classes) >= 16
    types = [cls.type for cls in classes]
    assert len(types) == len(set(types)), types
    protocol_types = set(worker.ProtocolError.TYPES.values())
    assert not protocol_types & set(types)


def contract_error_rows() -> list[tuple[str, int | None, int | None]]:
    rows = []
    for cells in table_rows(contract_section("Errors")):
        name, status, exit_code = cells[0].strip("`"), cells[1], cells[2]
        rows.append((name, int(status) if status else None, int(exit_code) if exit_code else None))
    return rows


def test_contract_error_table_is_parsed() -> None:
    rows = contract_error_rows()
    assert len(rows) >= 21
    assert ("input_too_long", 413, 2) in rows
    assert ("configuration", None, 78) in rows


@pytest.mark.parametrize("name, status, exit_code", contract_error_rows(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_error_classes_match_contract_table(name: str, status: int | None, exit_code: int | None) -> None:
    by_type = {cls.type: cls for cls in all_error_classes() if cls is not worker.ProtocolError}
    if name in by_type:
        cls = by_type[name]
        if status is not None:
            assert cls.status == status
        if exit_code is not None:
            assert cls.exit_code == exit_code
    else:
        assert name in worker.ProtocolError.TYPES.values(), f"{name} has neither a class nor a ProtocolError status"
        assert status is not None and exit_code is None
        exc = worker.ProtocolError(status)
        assert exc.type == name
        assert exc.status == status


def test_every_error_type_is_documented() -> None:
    documented = {name for name, _, _ in contract_error_rows()}
    code_types = {cls.type for cls in all_error_classes() if cls is not worker.ProtocolError}
    code_types |= set(worker.ProtocolError.TYPES.values())
    assert code_types == documented


def test_retry_after_on_503_only() -> None:
    for cls in all_error_classes():
        if cls is worker.ProtocolError:
            continue
        if cls.status == 503:
            assert isinstance(cls.retry_after_s, int) and cls.retry_after_s > 0, cls
        else:
            assert cls.retry_after_s is None, cls


def test_exit_code_table_matches_constants() -> None:
    rows = table_rows(contract_section("Exit codes"))
    codes = {int(cells[0]) for cells in rows}
    assert codes == {
        worker.EXIT_OK,
        worker.EXIT_FAILED,
        worker.EXIT_USAGE,
        worker.EXIT_PROOF_FAILED,
        worker.EXIT_BUSY,
        worker.EXIT_CONFIG,
    } == {0, 1, 2, 3, 75, 78}


# ==================================================================================================
# 6. pipeline_properties
# ==================================================================================================

NPU_ONLY_KEYS = {"MAX_PROMPT_LEN", "MIN_RESPONSE_LEN", "PREFILL_HINT", "GENERATE_HINT", "EXPORT_BLOB", "BLOB_PATH"}


@pytest.mark.parametrize(
    "cache_dir, limits, expected",
    [
        param(
            Path("/cache/npu"),
            worker.Limits(),
            {
                "CACHE_DIR": "/cache/npu",
                "MAX_PROMPT_LEN": 1024,
                "MIN_RESPONSE_LEN": 256,
                "PREFILL_HINT": "DYNAMIC",
                "GENERATE_HINT": "FAST_COMPILE",
            },
            id="defaults-with-cache",
        ),
        param(
            None,
            worker.Limits(max_prompt_tokens=2048, min_response_tokens=128),
            {
                "MAX_PROMPT_LEN": 2048,
                "MIN_RESPONSE_LEN": 128,
                "PREFILL_HINT": "DYNAMIC",
                "GENERATE_HINT": "FAST_COMPILE",
            },
            id="custom-limits-no-cache",
        ),
    ],
)
def test_pipeline_properties_npu(cache_dir: Path | None, limits: worker.Limits, expected: dict[str, Any]) -> None:
    settings = worker.Settings(model_path=Path("/models/m"), device="NPU", cache_dir=cache_dir, limits=limits)
    properties = worker.pipeline_properties(settings)
    assert properties == expected
    assert "ATTENTION_BACKEND" not in properties


def test_pipeline_properties_emulated_npu_replace_the_generate_hint_by_a_whole_generate_model() -> None:
    settings = worker.Settings(model_path=Path("/models/m"), device="NPU", emulate_npu=True)
    properties = worker.pipeline_properties(settings)
    # NPUW refuses the two together: "GENERATE_HINT only works with default generate config!"
    assert "GENERATE_HINT" not in properties
    assert properties["NPUW_LLM_GENERATE_CONFIG"] == {"NPUW_ONLINE_PIPELINE": "NONE"}
    assert properties["NPUW_DEVICES"] == "CPU" and properties["MAX_PROMPT_LEN"] == 1024


@pytest.mark.parametrize(
    "cache_dir, expected",
    [
        param(Path("/cache/cpu"), {"CACHE_DIR": "/cache/cpu", "ATTENTION_BACKEND": "SDPA"}, id="with-cache"),
        param(None, {"ATTENTION_BACKEND": "SDPA"}, id="no-cache"),
    ],
)
def test_pipeline_properties_cpu(cache_dir: Path | None, expected: dict[str, Any]) -> None:
    settings = worker.Settings(
        model_path=Path("/models/m"),
        device="CPU",
        cache_dir=cache_dir,
        limits=worker.Limits(max_prompt_tokens=2048, min_response_tokens=128),
    )
    properties = worker.pipeline_properties(settings)
    assert properties == expected
    assert not NPU_ONLY_KEYS & set(properties)


# ==================================================================================================
# 7. check_model_path, find_busy_counter, SysfsBusyCounter
# ==================================================================================================


def make_model_dir(path: Path, files: tuple[str, ...] = worker.GENAI_MODEL_FILES) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("<net/>")
    return path


@pytest.mark.parametrize("device", ["NPU", "CPU"])
def test_check_model_path_missing(tmp_path: Path, device: str) -> None:
    with pytest.raises(worker.ConfigError) as info:
        worker.check_model_path(tmp_path / "nope", device)
    assert info.value.exit_code == 78
    assert "nope" in info.value.message


@pytest.mark.parametrize("device", ["NPU", "CPU"])
def test_check_model_path_empty_dir_lists_missing_files(tmp_path: Path, device: str) -> None:
    model = make_model_dir(tmp_path / "empty-model", ())
    with pytest.raises(worker.ConfigError) as info:
        worker.check_model_path(model, device)
    for name in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        assert name in info.value.message


def test_check_model_path_partial_dir_lists_only_missing(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "partial", ("openvino_model.xml",))
    with pytest.raises(worker.ConfigError) as info:
        worker.check_model_path(model, "NPU")
    assert "openvino_tokenizer.xml" in info.value.message
    assert "openvino_detokenizer.xml" in info.value.message
    assert "openvino_model.xml" not in info.value.message


@pytest.mark.parametrize("device", ["NPU", "CPU"])
def test_check_model_path_complete_dir_passes(tmp_path: Path, device: str) -> None:
    assert worker.check_model_path(make_model_dir(tmp_path / "model"), device) is None


def test_check_model_path_gguf(tmp_path: Path) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert worker.check_model_path(gguf, "CPU") is None
    with pytest.raises(worker.ConfigError) as info:
        worker.check_model_path(gguf, "NPU")
    assert "GGUF" in info.value.message and "CPU" in info.value.message


@pytest.mark.parametrize("device", ["NPU", "CPU"])
def test_check_model_path_other_file_refused(tmp_path: Path, device: str) -> None:
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(worker.ConfigError):
        worker.check_model_path(other, device)


def test_busy_counter_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "npu_busy_time_us"
    path.write_text("123456\n")
    counter = worker.find_busy_counter(path)
    assert counter.path == path
    assert counter.read_us() == 123456
    path.write_text("123999")
    assert counter.read_us() == 123999


@pytest.mark.parametrize("kind", ["missing-file", "directory"])
def test_busy_counter_explicit_missing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "npu_busy_time_us"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(worker.ConfigError) as info:
        worker.find_busy_counter(path)
    assert info.value.exit_code == 78
    assert "6.11" in info.value.message
    assert "--no-npu-proof" in info.value.message
    assert str(path) in info.value.message


def fake_sysfs(root: Path, devices: dict[str, str]) -> str:
    for name, content in devices.items():
        device = root / "class" / "accel" / name / "device"
        device.mkdir(parents=True)
        (device / "npu_busy_time_us").write_text(content)
    return str(root / "class" / "accel" / "accel*" / "device" / "npu_busy_time_us")


def test_busy_counter_discovery_picks_sorted_first(tmp_path: Path) -> None:
    pattern = fake_sysfs(tmp_path / "sys", {"accel1": "222\n", "accel0": "111\n"})
    counter = worker.find_busy_counter(None, pattern)
    assert counter.path == tmp_path / "sys" / "class" / "accel" / "accel0" / "device" / "npu_busy_time_us"
    assert counter.read_us() == 111


def test_busy_counter_discovery_nothing_found(tmp_path: Path) -> None:
    pattern = fake_sysfs(tmp_path / "sys", {})
    with pytest.raises(worker.ConfigError) as info:
        worker.find_busy_counter(None, pattern)
    assert "6.11" in info.value.message and "--no-npu-proof" in info.value.message


def test_busy_counter_default_pattern_is_documented() -> None:
    assert worker.BUSY_COUNTER_GLOB == "/sys/class/accel/accel*/device/npu_busy_time_us"
    assert worker.BUSY_COUNTER_GLOB in CONTRACT.read_text(encoding="utf-8")


@pytest.mark.parametrize("content", ["", "n/a\n", "12.5", "0x10", "\x00\x01"],
                         ids=["empty", "text", "float", "hex", "binary"])
def test_busy_counter_garbage_is_config_error(tmp_path: Path, content: str) -> None:
    pattern = fake_sysfs(tmp_path / "sys", {"accel0": content})
    with pytest.raises(worker.ConfigError):
        worker.find_busy_counter(None, pattern)
    explicit = tmp_path / "explicit_busy"
    explicit.write_text(content)
    with pytest.raises(worker.ConfigError):
        worker.find_busy_counter(explicit)


def test_busy_counter_unreadable_is_config_error(tmp_path: Path) -> None:
    # A directory where the glob expects the counter file: reading it fails with an OSError.
    (tmp_path / "sys" / "class" / "accel" / "accel0" / "device" / "npu_busy_time_us").mkdir(parents=True)
    pattern = str(tmp_path / "sys" / "class" / "accel" / "accel*" / "device" / "npu_busy_time_us")
    with pytest.raises(worker.ConfigError) as info:
        worker.find_busy_counter(None, pattern)
    assert "IsADirectoryError" in info.value.message


@pytest.mark.parametrize(
    "content",
    [param("", id="empty"), param("busy\n", id="text"), param("1.5", id="float"), param(None, id="missing")],
)
def test_sysfs_busy_counter_garbage(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "npu_busy_time_us"
    if content is not None:
        path.write_text(content)
    with pytest.raises(worker.NpuProofFailed) as info:
        worker.SysfsBusyCounter(path).read_us()
    assert info.value.exit_code == 3
    assert info.value.status == 502


@pytest.mark.parametrize("content, value", [("42", 42), ("  42 \n", 42), ("0\n", 0)], ids=["plain", "padded", "zero"])
def test_sysfs_busy_counter_reads_integer(tmp_path: Path, content: str, value: int) -> None:
    path = tmp_path / "npu_busy_time_us"
    path.write_text(content)
    assert worker.SysfsBusyCounter(path).read_us() == value


# ==================================================================================================
# 8. CLI parsing
# ==================================================================================================

ENV_VARS = (
    "OV_GENAI_NPU_MODEL",
    "OV_GENAI_NPU_CACHE",
    "OV_GENAI_NPU_HOST",
    "OV_GENAI_NPU_PORT",
    "OV_GENAI_NPU_DEVICE",
    "OV_GENAI_NPU_LOCK",
    "OV_GENAI_NPU_BUSY_PATH",
)


def no_pipeline(settings: worker.Settings) -> worker.Pipeline:
    pytest.fail("the CLI tried to load a model")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """worker.main with a clean OV_GENAI_NPU_* environment, no logging set-up and no model loader."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(worker, "configure_logging", lambda *_: None)

    def run(*argv: str) -> int:
        return worker.main(list(argv), pipeline_factory=no_pipeline)

    return run


@pytest.mark.parametrize(
    "argv, code, stderr_has",
    [
        param(["--help"], 0, "", id="help"),
        param(["--version"], 0, "", id="version"),
        param(["--frobnicate"], 2, "unrecognized arguments", id="unknown-flag"),
        param(["--port", "70000"], 2, "--port", id="port-too-high"),
        param(["--port", "-1"], 2, "--port", id="port-negative"),
        param(["--port", "http"], 2, "--port", id="port-not-int"),
        param(["--job", "title"], 2, "--job needs --input", id="job-without-input"),
        param(["--job", "poem", "--input", "x"], 2, "--job", id="unknown-job"),
        param(["--input", "x"], 2, "need --job", id="input-without-job"),
        param(["--max-new-tokens", "5"], 2, "need --job", id="max-new-tokens-without-job"),
        param(["--job", "title", "--input", "x", "--input-file", "-"], 2, "not allowed with",
              id="input-and-input-file"),
        param(["--model", "/m", "--demo"], 2, "not allowed with", id="model-and-demo"),
        param(["--queue-depth", "0"], 2, "--queue-depth must be at least 1", id="queue-depth-0"),
        param(["--max-input-chars", "0"], 2, "--max-input-chars", id="max-input-chars-0"),
        param(["--max-new-tokens-limit", "-3"], 2, "--max-new-tokens-limit", id="max-new-tokens-limit-negative"),
        param(["--max-prompt-tokens", "0"], 2, "--max-prompt-tokens", id="max-prompt-tokens-0"),
        param(["--min-response-tokens", "0"], 2, "--min-response-tokens", id="min-response-tokens-0"),
        param(["--lock-timeout-s", "-1"], 2, "--lock-timeout-s", id="lock-timeout-negative"),
        param(["--device", "GPU"], 2, "--device", id="device-gpu-flag"),
    ],
)
def test_main_usage(cli: Any, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, stderr_has: str) -> None:
    assert cli(*argv) == code
    captured = capsys.readouterr()
    if code == 0:
        assert captured.out.strip()
    assert stderr_has in captured.err


def test_main_refuses_non_loopback_host(cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli("--host", "0.0.0.0", "--model", str(tmp_path), "--device", "CPU") == 78
    err = capsys.readouterr().err
    assert "configuration" in err
    assert "refusing to bind '0.0.0.0'" in err
    assert "127.0.0.1" in err


def test_main_refuses_non_loopback_host_from_env(
    cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OV_GENAI_NPU_HOST", "192.168.1.10")
    monkeypatch.setenv("OV_GENAI_NPU_MODEL", str(tmp_path))
    assert cli() == 78
    assert "refusing to bind '192.168.1.10'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--job", "title", "--input", "x"]], ids=["serve", "one-shot"])
def test_main_without_model_is_config_error(cli: Any, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert cli(*argv) == 78
    err = capsys.readouterr().err
    assert "no model" in err
    assert "OV_GENAI_NPU_MODEL" in err


def test_main_device_from_env_is_checked(
    cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OV_GENAI_NPU_DEVICE", "GPU")
    monkeypatch.setenv("OV_GENAI_NPU_MODEL", str(tmp_path))
    assert cli() == 2
    assert "--device must be one of NPU, CPU" in capsys.readouterr().err


FULL_ENV = {
    "OV_GENAI_NPU_MODEL": "/env/models/Env-Model-ov",
    "OV_GENAI_NPU_CACHE": "/env/cache",
    "OV_GENAI_NPU_HOST": "::1",
    "OV_GENAI_NPU_PORT": "1234",
    "OV_GENAI_NPU_DEVICE": "CPU",
    "OV_GENAI_NPU_LOCK": "/env/lock/npu.lock",
    "OV_GENAI_NPU_BUSY_PATH": "/env/busy_us",
    "XDG_CACHE_HOME": "/xdg/cache",
}


def settings_for(argv: list[str], env: dict[str, str]) -> worker.Settings:
    parser = worker.build_parser(env)
    args = parser.parse_args(argv)
    worker.check_numbers(parser, args)
    return worker.settings_from_args(args, env)


def test_settings_from_env() -> None:
    settings = settings_for([], FULL_ENV)
    assert settings == worker.Settings(
        model_path=Path("/env/models/Env-Model-ov"),
        device="CPU",
        cache_dir=Path("/env/cache"),
        host="::1",
        port=1234,
        lock_path=Path("/env/lock/npu.lock"),
        busy_path=Path("/env/busy_us"),
    )


def test_settings_flags_override_env() -> None:
    argv = [
        "--model", "/flag/models/Flag-Model-ov",
        "--cache-dir", "/flag/cache",
        "--host", "localhost",
        "--port", "4321",
        "--device", "NPU",
        "--lock-file", "/flag/lock",
        "--busy-path", "/flag/busy_us",
    ]  # fmt: skip
    settings = settings_for(argv, FULL_ENV)
    assert settings.model_path == Path("/flag/models/Flag-Model-ov")
    assert settings.cache_dir == Path("/flag/cache")
    assert settings.host == "localhost"
    assert settings.port == 4321
    assert settings.device == "NPU"
    assert settings.lock_path == Path("/flag/lock")
    assert settings.busy_path == Path("/flag/busy_us")


def test_settings_defaults_without_env(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "XDG_RUNTIME_DIR": str(tmp_path)}
    settings = settings_for(["--model", "/models/Qwen-ov"], env)
    assert settings.device == "NPU"
    assert settings.host == "127.0.0.1"
    assert settings.port == 18820
    assert settings.cache_dir == tmp_path / "xdg-cache" / "openvino-genai-npu-worker" / "Qwen-ov"
    assert settings.lock_path == tmp_path / "openvino-genai-npu-worker" / "npu.lock"
    assert settings.busy_path is None
    assert settings.npu_proof is True
    assert settings.limits == worker.Limits()
    assert settings.queue_depth == 8
    assert settings.lock_timeout_s == 60.0


def test_settings_limit_flags() -> None:
    argv = [
        "--model", "/m",
        "--max-input-chars", "100",
        "--max-new-tokens-limit", "32",
        "--max-prompt-tokens", "512",
        "--min-response-tokens", "64",
        "--queue-depth", "3",
        "--lock-timeout-s", "2.5",
        "--no-npu-proof",
    ]  # fmt: skip
    settings = settings_for(argv, {"XDG_CACHE_HOME": "/c", "XDG_RUNTIME_DIR": "/nonexistent-run"})
    assert settings.limits == worker.Limits(
        max_input_chars=100, max_new_tokens=32, max_prompt_tokens=512, min_response_tokens=64
    )
    assert settings.limits.context_tokens == 576
    assert settings.queue_depth == 3
    assert settings.lock_timeout_s == 2.5
    assert settings.npu_proof is False
    assert settings.proof_mode == "unavailable"


def test_settings_device_from_env_rejected_by_check_numbers() -> None:
    parser = worker.build_parser({"OV_GENAI_NPU_DEVICE": "GPU"})
    args = parser.parse_args(["--model", "/m"])
    with pytest.raises(SystemExit) as info:
        worker.check_numbers(parser, args)
    assert info.value.code == 2


@pytest.mark.parametrize(
    "name, attribute",
    [
        param("OV_GENAI_NPU_CACHE", "cache_dir", id="cache"),
        param("OV_GENAI_NPU_LOCK", "lock_path", id="lock"),
        param("OV_GENAI_NPU_BUSY_PATH", "busy_path", id="busy-path"),
    ],
)
def test_empty_env_var_means_unset(tmp_path: Path, name: str, attribute: str) -> None:
    base = {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "XDG_RUNTIME_DIR": str(tmp_path)}
    expected = getattr(settings_for(["--model", "/models/m"], base), attribute)
    assert getattr(settings_for(["--model", "/models/m"], {**base, name: ""}), attribute) == expected


def test_lock_timeout_nan_is_rejected() -> None:
    parser = worker.build_parser({})
    args = parser.parse_args(["--model", "/m", "--lock-timeout-s", "nan"])
    with pytest.raises(SystemExit) as info:
        worker.check_numbers(parser, args)
    assert info.value.code == 2
