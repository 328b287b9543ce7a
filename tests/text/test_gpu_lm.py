"""SmolLM2 (real GGUF Q4_1 weights) on CUDA (torch backend, our Triton kernels inside: W4A16 GEMV/GEMM,
RMSNorm with residual, RoPE, flash/decode attention, SwiGLU) against the same model on the CPU in float32.
Needs a GPU: `pytest -m gpu tests/text/test_gpu_lm.py`."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a CPU cache is in one sentence."]


def test_cuda_greedy_tokens_equal_cpu_fp32():
    from edge_mmm.kernels import kernel_mode
    from edge_mmm.text.api import load_lm
    from edge_mmm.text.generation import GenerationConfig

    cpu = load_lm(backend="torch")
    gpu = load_lm(backend="torch", device="cuda")
    cfg = GenerationConfig(max_tokens=32)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        want = cpu.generate(messages, cfg).token_ids
        assert gpu.generate(messages, cfg).token_ids == want, prompt
        with kernel_mode("reference"):  # the same GPU model with the models' own torch code
            assert gpu.generate(messages, cfg).token_ids == want, prompt
