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


class _Tok:
    """Ids are bytes: id 0 is the stop token (its own text b'<eot>' must never show)."""

    stop_ids = (0,)

    def detokenizer(self):
        from pocketllama.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(lambda i: b"<eot>" if i == 0 else bytes([i]))


def _run(stopper, tokens):
    out = []
    for n, t in enumerate(tokens):
        text, finish = stopper.step(t, n)
        out.append(text)
        if finish:
            return "".join(out), finish
    return "".join(out), None


def test_token_stopper_stop_id_releases_held_text_but_not_its_own():
    from pocketllama.engine.stops import TokenStopper

    st = TokenStopper(_Tok(), ["XY"], [0], budget=10)
    assert _run(st, [ord("a"), ord("X"), 0]) == ("aX", "stop")  # "X" was held back as a prefix of "XY"


def test_token_stopper_budget_and_stop_string_at_the_last_token():
    from pocketllama.engine.stops import TokenStopper

    assert _run(TokenStopper(_Tok(), [], [0], budget=2), [ord("a"), ord("b"), ord("c")]) == ("ab", "length")
    assert _run(TokenStopper(_Tok(), ["bc"], [0], budget=3), [ord("a"), ord("b"), ord("c")]) == ("a", "stop")
    # a stop id not in the set is ordinary text; the tokenizer's ids do not count unless passed
    assert _run(TokenStopper(_Tok(), [], [], budget=2), [0, ord("z")]) == ("<eot>z", "length")
