"""The opt-in early endpoint's sentence test (runtime/endpoint.py)."""

import pytest

from edge_mmm.runtime.endpoint import ends_sentence


@pytest.mark.parametrize("text", ["What do you see?", "Describe the scene.", "Stop!", " what colour is it? ",
                                  '"Is it raining?"', "Read the sign (the red one).", "Is it 42?"])
def test_finished_sentences(text):
    assert ends_sentence(text)


@pytest.mark.parametrize("text", ["", "   ", "What do you", "Can you see the red car", "I want to.",
                                  "parked next to the.", "Tell me about...", "Tell me about…", "and then?",
                                  "It is, because.", "?", "..."])
def test_unfinished_sentences(text):
    assert not ends_sentence(text)
