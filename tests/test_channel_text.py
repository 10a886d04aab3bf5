"""channels.text: the one text splitter and Retry-After reader of all platform adapters."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from channels.text import WHITESPACE, retry_after_s, split_text

EMOJI = "\N{GRINNING FACE}"  # U+1F600: one character, two UTF-16 code units


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


# -- split_text --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "parts"),
    [
        # empty and whitespace-only text: nothing to send
        pytest.param("", 10, [], id="empty"),
        pytest.param("   \n\t", 10, [], id="whitespace-only-fits"),
        pytest.param(" " * 20, 5, [], id="whitespace-only-long"),
        # text that fits is kept as it is
        pytest.param("hello", 10, ["hello"], id="short"),
        pytest.param("0123456789", 10, ["0123456789"], id="exact-limit"),
        pytest.param("  hi  ", 10, ["  hi  "], id="fits-with-outer-whitespace"),
        # the whitespace at a cut ends the earlier part
        pytest.param("aaaaaa bbbbbbb", 10, ["aaaaaa ", "bbbbbbb"], id="cut-after-space"),
        pytest.param("one two three four", 9, ["one two ", "three ", "four"], id="several-cuts"),
        pytest.param("line one\nline two", 9, ["line one\n", "line two"], id="cut-after-line-break"),
        # a word ending exactly at the limit: the whitespace after it does not fit and is dropped
        pytest.param("hello world again", 11, ["hello world", "again"], id="word-ends-at-limit"),
        pytest.param("hello world", 5, ["hello", "world"], id="word-ends-at-limit-2"),
        pytest.param("aaaa bbbbb cc", 10, ["aaaa bbbbb", "cc"], id="word-ends-at-limit-3"),
        pytest.param("abcde ", 5, ["abcde"], id="exact-limit-plus-trailing-space"),
        pytest.param("ab" + " " * 6 + "cd", 5, ["ab   ", "cd"], id="whitespace-run-across-the-limit"),
        pytest.param(" " * 8 + "abc", 5, ["abc"], id="whitespace-only-first-part-dropped"),
        # no whitespace in the later half of the window: mid-word cut
        pytest.param("abcdefghijkl", 5, ["abcde", "fghij", "kl"], id="no-whitespace"),
        pytest.param("a bcdefghijkl", 5, ["a bcd", "efghi", "jkl"], id="whitespace-too-early"),
        pytest.param("   abcdefgh", 5, ["   ab", "cdefg", "h"], id="leading-whitespace-kept"),
        pytest.param("a " + "b" * 12 + " c", 5, ["a bbb", "bbbbb", "bbbb ", "c"], id="word-longer-than-limit"),
        # characters, not UTF-16 units, unless asked
        pytest.param("abc" + EMOJI + "d", 4, ["abc" + EMOJI, "d"], id="emoji-counts-one-char"),
    ],
)
def test_split_text_in_characters(text: str, limit: int, parts: list[str]) -> None:
    assert split_text(text, limit) == parts


@pytest.mark.parametrize(
    ("text", "limit", "parts"),
    [
        pytest.param("", 4, [], id="empty"),
        pytest.param(EMOJI * 2, 4, [EMOJI * 2], id="exact-limit"),
        pytest.param(EMOJI * 3, 4, [EMOJI * 2, EMOJI], id="emoji-counts-two"),
        pytest.param("a" + EMOJI * 2, 4, ["a" + EMOJI, EMOJI], id="pair-never-cut"),
        pytest.param("abc" + EMOJI + "d", 4, ["abc", EMOJI + "d"], id="emoji-across-the-limit"),
        pytest.param("ab " + EMOJI * 2, 5, ["ab " + EMOJI, EMOJI], id="whitespace-too-early"),
        pytest.param("abc " + EMOJI + "de", 5, ["abc ", EMOJI + "de"], id="cut-after-space-before-emoji"),
        pytest.param("abc" + EMOJI + " de", 5, ["abc" + EMOJI, "de"], id="emoji-ends-at-limit"),
        pytest.param("a" * 6 + " " + EMOJI * 2, 8, ["a" * 6 + " ", EMOJI * 2], id="emoji-word-moves-on"),
        pytest.param(EMOJI * 5, 2, [EMOJI] * 5, id="one-emoji-per-part"),
    ],
)
def test_split_text_in_utf16_units(text: str, limit: int, parts: list[str]) -> None:
    assert split_text(text, limit, utf16=True) == parts
    assert all(units(part) <= limit for part in parts)


@pytest.mark.parametrize(
    ("text", "limit", "prefer_line_breaks", "parts"),
    [
        pytest.param("aaaaaaaa\nbb cc dddd", 15, True, ["aaaaaaaa\n", "bb cc dddd"], id="line-break-wins"),
        pytest.param("aaaaaaaa\nbb cc dddd", 15, False, ["aaaaaaaa\nbb cc ", "dddd"], id="last-space-without"),
        pytest.param("a\nbbbbbb cccc", 10, True, ["a\nbbbbbb ", "cccc"], id="early-line-break-not-used"),
        pytest.param("aaaaaaa bbbbbbbb", 10, True, ["aaaaaaa ", "bbbbbbbb"], id="no-line-break-then-space"),
        pytest.param("aaaaaaaaa\r\nbbb", 10, True, ["aaaaaaaaa\r", "bbb"], id="crlf-across-the-limit"),
        pytest.param("abcdefghijkl", 5, True, ["abcde", "fghij", "kl"], id="mid-word"),
        pytest.param("short\ntext", 10, True, ["short\ntext"], id="exact-limit"),
    ],
)
def test_split_text_preferring_line_breaks(text: str, limit: int, prefer_line_breaks: bool, parts: list[str]) -> None:
    assert split_text(text, limit, prefer_line_breaks=prefer_line_breaks) == parts


def test_no_break_spaces_are_not_cut_at() -> None:
    assert split_text("aaaa\u00a0bbbbbb", 6) == ["aaaa\u00a0b", "bbbbb"]
    assert "\u00a0" not in WHITESPACE and "\u3000" in WHITESPACE


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": -1}, {"limit": 1, "utf16": True}],
)
def test_a_limit_too_small_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        split_text("text", **kwargs)  # type: ignore[arg-type]


def assert_only_whitespace_at_cuts_lost(text: str, parts: list[str]) -> None:
    """``parts`` are ``text`` in order, less some whitespace between them (or before or after)."""
    position = 0
    for part in parts:
        while not text.startswith(part, position):
            assert text[position] in WHITESPACE, (text, parts)
            position += 1
        position += len(part)
    assert not text[position:].strip(WHITESPACE)


@pytest.mark.parametrize("utf16", [False, True])
@pytest.mark.parametrize("prefer_line_breaks", [False, True])
def test_split_text_keeps_everything_in_order_within_the_limit(utf16: bool, prefer_line_breaks: bool) -> None:
    rng = random.Random(20240601)
    width = units if utf16 else len
    for _ in range(300):
        words = ["".join(rng.choice("ab" + EMOJI) for _ in range(rng.randint(1, 12))) for _ in range(40)]
        text = "".join(word + rng.choice(" \n") for word in words).rstrip()
        limit = rng.randint(2, 30)
        parts = split_text(text, limit, utf16=utf16, prefer_line_breaks=prefer_line_breaks)
        assert all(0 < width(part) <= limit and part.strip(WHITESPACE) for part in parts)
        assert_only_whitespace_at_cuts_lost(text, parts)


def test_split_text_with_whitespace_runs_loses_only_whitespace() -> None:
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice(["a", "b", " ", "  ", "\n", "\t", EMOJI]) for _ in range(rng.randint(0, 60)))
        limit = rng.randint(2, 12)
        parts = split_text(text, limit, utf16=True)
        assert all(units(part) <= limit and part.strip(WHITESPACE) for part in parts)
        assert_only_whitespace_at_cuts_lost(text, parts)


def test_words_up_to_half_the_limit_are_never_cut() -> None:
    words = [f"w{i:03d}" * (1 + i % 5) for i in range(300)]  # 4 to 20 characters
    for limit in range(42, 48):
        parts = split_text(" ".join(words), limit)
        assert [word for part in parts for word in part.split()] == words


# -- retry_after_s -----------------------------------------------------------------------------

NOW = 1445412480.0  # 2015-10-21T07:28:00Z


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("7", 7.0, id="delta-seconds"),
        pytest.param(" 7 ", 7.0, id="padded"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("1.5", 1.5, id="fraction"),
        pytest.param("-1", None, id="negative"),
        pytest.param("+5", None, id="signed"),
        pytest.param("1e3", None, id="exponent"),
        pytest.param("nan", None, id="nan"),
        pytest.param("inf", None, id="inf"),
        pytest.param("9" * 400, None, id="too-large"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Wed, 21 Oct 2015 07:28:30 GMT", 30.0, id="http-date"),
        pytest.param("Wednesday, 21-Oct-15 07:28:30 GMT", 30.0, id="rfc850-date"),
        pytest.param("Wed Oct 21 07:28:30 2015", 30.0, id="asctime-date-is-gmt"),
        pytest.param("Wed, 21 Oct 2015 09:28:30 +0200", 30.0, id="date-with-offset"),
        pytest.param("Wed, 21 Oct 2015 07:27:30 GMT", 0.0, id="date-in-the-past"),
        pytest.param("Wed, 32 Oct 2015 07:28:30 GMT", None, id="impossible-date"),
        pytest.param("Wed, 21 Oct 99999999999999999999 07:28:30 GMT", None, id="absurd-year"),
    ],
)
def test_retry_after_s(value: str | None, seconds: float | None) -> None:
    assert retry_after_s(value, NOW) == seconds


def test_retry_after_s_counts_a_date_from_the_current_time() -> None:
    value = email.utils.formatdate(time.time() + 100, usegmt=True)
    seconds = retry_after_s(value)
    assert seconds is not None and 90 <= seconds <= 100
