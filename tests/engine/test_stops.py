"""Tests for engine/stops.py: stop strings across deltas are held back, never emitted, and released when
they cannot match any more."""

from __future__ import annotations

from pocketllama.engine.stops import StopStringMatcher


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    out, stopped = [], False
    for d in deltas:
        text, stopped = matcher.feed(d)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_stop_string_split_over_deltas_is_never_emitted():
    out, stopped = feed_all(StopStringMatcher(["</s>"]), ["ab", "<", "/", "s>tail"])
    assert out == ["ab", "", "", ""] and stopped


def test_held_back_prefix_is_released_when_it_stops_matching():
    m = StopStringMatcher(["</s>"])
    out, stopped = feed_all(m, ["a<", "/x", "y"])
    assert out == ["a", "</x", "y"] and not stopped
    assert m.flush() == ""


def test_flush_returns_held_back_text_at_the_end():
    m = StopStringMatcher(["STOP"])
    assert m.feed("hi ST") == ("hi ", False)
    assert m.flush() == "ST"


def test_earliest_stop_wins_and_text_before_it_is_emitted():
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", True)
    assert m.stopped == "lo w"
    assert m.feed("more") == ("", True) and m.flush() == ""


def test_overlapping_prefix_candidates_hold_back_the_longest():
    m = StopStringMatcher(["aab"])
    assert m.feed("xaa") == ("x", False)  # "aa" could start "aab"
    assert m.feed("a") == ("a", False)  # "aaa": only the last "aa" can still start it
    assert m.feed("b") == ("", True)


def test_no_stops_passes_text_through():
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False)
