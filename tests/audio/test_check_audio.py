"""`check_audio`: what a waveform passed as an array may be."""

import numpy as np
import pytest

from edge_mmm.audio.io import check_audio
from edge_mmm.errors import InputError

RNG = np.random.default_rng(0)
FLOAT = (RNG.uniform(-0.9, 0.9, 16000)).astype(np.float32)


@pytest.mark.parametrize("dtype,full_scale", [(np.int16, 32768), (np.int32, 2 ** 31)])
def test_integer_pcm_is_scaled_to_float(dtype, full_scale):
    pcm = np.round(FLOAT * (full_scale - 1)).astype(dtype)
    got = check_audio(pcm)
    assert got.dtype == np.float32 and np.abs(got - pcm.astype(np.float64) / full_scale).max() < 1e-6
    assert np.abs(got - FLOAT).max() < 2.0 / full_scale + 1e-7
    assert check_audio(np.array([-full_scale, full_scale - 1] * 8000, dtype)).min() == -1.0


def test_one_row_or_column_is_mono_and_the_rest_is_refused():
    assert np.array_equal(check_audio(FLOAT[None, :]), FLOAT) and np.array_equal(check_audio(FLOAT[:, None]), FLOAT)
    with pytest.raises(InputError, match="mono"):
        check_audio(np.stack([FLOAT, FLOAT]))
    with pytest.raises(InputError, match="int16/int32 PCM"):
        check_audio((FLOAT * 100).astype(np.uint8))
    with pytest.raises(InputError, match="NaN"):
        check_audio(np.full(16000, np.nan, np.float32))
