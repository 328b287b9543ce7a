"""The live assistant's loop stop: `in_loop` and `GenerationConfig(stop_loops=True)` on a scripted backend."""

import numpy as np
import pytest

from edge_mmm.text.generation import LOOP_MIN_TOKENS, GenerationConfig, TokenStream, in_loop

VOCAB = 100


class _Cache:
    def __init__(self):
        self.length = 0

    def truncate(self, n):
        self.length = min(self.length, n)


class _Scripted:
    """A backend whose greedy choice follows `script` token by token."""

    context_length = 4096

    def __init__(self, script):
        self.script = list(script)

    def new_cache(self):
        return _Cache()

    def _logits(self, cache):
        logits = np.zeros(VOCAB, np.float32)
        logits[self.script[cache.length - self.n_prompt]] = 1.0
        return logits

    def prefill(self, ids, cache):
        self.n_prompt = len(ids)
        cache.length += len(ids)
        return self._logits(cache)

    def decode(self, token_id, cache):
        cache.length += 1
        return self._logits(cache)


class _Words:
    stop_token_ids = [0]

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def _generate(script, stop_loops, max_tokens=200):
    stream = TokenStream(_Scripted(script + [0] * 300), _Words(), [1, 2, 3],
                         GenerationConfig(max_tokens=max_tokens, stop_loops=stop_loops), _Cache())
    text = "".join(stream)
    assert text == stream.result.text
    return stream.result


LOOP = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # a 10-token clause


def test_a_looping_answer_stops_after_three_copies_only_when_asked():
    script = [5, 6, 7] + LOOP * 20
    g = _generate(script, stop_loops=True)
    assert g.finish_reason == "loop" and g.token_ids == [5, 6, 7] + LOOP * 3  # 30 >= LOOP_MIN_TOKENS tokens
    assert g.text == "".join(f" w{i}" for i in g.token_ids)
    off = _generate(script, stop_loops=False)
    assert off.finish_reason == "length" and len(off.token_ids) == 200


def test_an_answer_that_ends_is_not_touched():
    script = [5, 6, 7] + LOOP * 2 + [8, 9]  # two copies, then the end of turn
    assert _generate(script, stop_loops=True).token_ids == script


@pytest.mark.parametrize("ids, looping", [
    ([7] * LOOP_MIN_TOKENS, True),  # one token, over and over
    ([7] * (LOOP_MIN_TOKENS - 1), False),  # not yet: too short a span
    ([1, 2] * 12, True),
    ([1, 2] * 11 + [1], False),
    ([9] + LOOP * 3, True),
    ([9] + LOOP * 2 + LOOP[:9], False),  # two copies and most of a third
    (list(range(64)) * 3, True),  # the longest block looked at
    (list(range(65)) * 3, False),
    (list(range(50)) + [3, 4, 5] * 6, False),  # a phrase said a few times is not a loop
    ([], False),
])
def test_in_loop(ids, looping):
    assert in_loop(ids) is looping
    assert in_loop(np.array(ids, np.int64)) is looping


def test_the_terminal_says_why_a_looping_answer_ended(capsys):
    from edge_mmm.cli import _print_event
    from edge_mmm.runtime.events import Event

    for finish, cancelled, tail in (("loop", False, " [stopped: it repeated itself]\n"), ("stop", False, "\n"),
                                    ("loop", True, " [interrupted]\n")):
        _print_event(Event("answer.done", {"text": "x", "turn": 1, "finish_reason": finish, "cancelled": cancelled}),
                     json_out=False)
        assert capsys.readouterr().out == tail
