"""preprocess_image and log_mel: Triton (interpreter on CPU) vs their torch references."""

import numpy as np
import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels import log_mel, log_mel_reference, preprocess_image, preprocess_image_reference
from kernel_testing import DEVICE, assert_close

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("hw,size", [((30, 40), (17, 23)), ((12, 10), 20), ((7, 9), (7, 9))])
@pytest.mark.parametrize("bgr", [True, False])
def test_preprocess_image(hw, size, bgr):
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8, device=DEVICE)
    # float32 interpolation in both; x/255/std amplifies rounding to ~1e-5
    assert_close(preprocess_image(frame, size, CLIP_MEAN, CLIP_STD, bgr=bgr),
                 preprocess_image_reference(frame, size, CLIP_MEAN, CLIP_STD, bgr=bgr), 1e-4, 1e-5)


def test_preprocess_image_crop_view_and_half_output():
    torch.manual_seed(1)
    big = torch.randint(0, 256, (40, 50, 4), dtype=torch.uint8, device=DEVICE)
    frame = big[5:35, 10:46, :3]  # a crop of a BGRA buffer: strided, never copied
    got = preprocess_image(frame, (16, 16), MEAN, STD, dtype=torch.float16)
    assert got.dtype == torch.float16 and got.shape == (3, 16, 16)
    assert_close(got, preprocess_image_reference(frame, (16, 16), MEAN, STD, dtype=torch.float16), 2e-3, 2e-3)


def test_preprocess_image_matches_opencv_layout():
    """BGR pixel (b, g, r) = (255, 0, 0) is pure blue: it lands in output channel 2."""
    frame = torch.zeros(4, 4, 3, dtype=torch.uint8, device=DEVICE)
    frame[..., 0] = 255
    out = preprocess_image(frame, 4, MEAN, STD)
    assert torch.allclose(out[2], torch.ones(4, 4, device=DEVICE)) and torch.allclose(out[0], -torch.ones(4, 4, device=DEVICE))


def test_preprocess_image_errors():
    frame = torch.zeros(4, 4, 3, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(InputError, match="frame must be"):
        preprocess_image(frame.float(), 4, MEAN, STD)
    with pytest.raises(InputError, match="size"):
        preprocess_image(frame, (0, 4), MEAN, STD)
    with pytest.raises(InputError, match="mean and std"):
        preprocess_image(frame, 4, MEAN, (1.0, 0.0, 1.0))


@pytest.mark.parametrize("n_samples,n_mels,padding", [(3200, 80, 0), (4000, 128, 0), (1000, 80, 900)])
def test_log_mel_matches_whisper_front_end(n_samples, n_mels, padding):
    rng = np.random.default_rng(n_samples)
    t = np.arange(n_samples) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n_samples)).astype(np.float32)
    audio = torch.from_numpy(audio).to(DEVICE)
    # float32 throughout; the filterbank sum runs in another order than torch's matmul: ~1e-6 relative
    assert_close(log_mel(audio, n_mels, padding), log_mel_reference(audio, n_mels, padding), 2e-5, 1e-5)


def test_log_mel_matches_openai_whisper():
    whisper_audio = pytest.importorskip("whisper.audio")
    audio = torch.from_numpy(np.random.default_rng(0).standard_normal(2400).astype(np.float32) * 0.1)
    want = whisper_audio.log_mel_spectrogram(audio, 80)
    assert_close(log_mel(audio.to(DEVICE), 80).cpu(), want, 2e-5, 1e-5)


def test_log_mel_errors():
    with pytest.raises(InputError, match="n_mels"):
        log_mel(torch.zeros(1000, device=DEVICE), 64)
    with pytest.raises(InputError, match="samples"):
        log_mel(torch.zeros(100, device=DEVICE), 80)
    with pytest.raises(InputError, match="audio must have"):
        log_mel(torch.zeros(2, 1000, device=DEVICE), 80)
