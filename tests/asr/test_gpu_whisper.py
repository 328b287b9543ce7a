"""Whisper tiny.en on CUDA (torch backend, our Triton attention and log-mel kernels inside) against the same
model on the CPU in float32. Needs a GPU: `pytest -m gpu tests/asr/test_gpu_whisper.py`."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_tokens_equal_cpu_fp32(tiny_en_dir, speech_clips):
    from edge_mmm.asr.api import TranscribeOptions, load_asr
    from edge_mmm.asr.transcribe import padded_log_mel
    from edge_mmm.kernels import kernel_mode

    cpu = load_asr(tiny_en_dir, backend="torch")
    gpu = load_asr(tiny_en_dir, backend="torch", device="cuda")
    opts = TranscribeOptions(beam_size=1, timestamps=True)
    for path, _, audio in speech_clips:
        # front end: the log_mel kernel vs openai-whisper's math, 2e-5 as in tests/kernels
        np.testing.assert_allclose(padded_log_mel(gpu.backend, audio), padded_log_mel(cpu.backend, audio),
                                   atol=2e-5, rtol=1e-5)
        want = [s.tokens for s in cpu.transcribe(path, opts).segments]
        assert [s.tokens for s in gpu.transcribe(path, opts).segments] == want, path
        with kernel_mode("reference"):  # the same GPU model without our kernels
            assert [s.tokens for s in gpu.transcribe(path, opts).segments] == want, path
