"""The models call the kernels: tiny Llama (INT4), SigLIP and Whisper run with kernel mode "triton"
(the Triton interpreter here, the GPU on CUDA) and match the same model in mode "reference" (the
models' own torch code, untouched by the kernels)."""

import pytest
import torch

from edge_mmm.kernels import dispatch, kernel_mode
from kernel_testing import DEVICE, assert_close


def _count_launches(monkeypatch):
    launched = []
    original = dispatch._LazyKernel.__getitem__

    def getitem(self, grid):
        launched.append(self.__name__)
        return original(self, grid)

    monkeypatch.setattr(dispatch._LazyKernel, "__getitem__", getitem)
    return launched


def test_llama_int4_prefill_and_decode(monkeypatch):
    from edge_mmm.models.llama import KVCache, Llama, LlamaConfig
    from edge_mmm.quant import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    model = quantize_model(Llama(cfg).eval(), bits=4, group_size=32).to(DEVICE)
    prompt = torch.randint(0, 97, (1, 7), device=DEVICE)

    def run():
        cache = KVCache.for_config(cfg, 12, device=DEVICE)
        logits = [model(prompt, cache=cache)]
        for step in range(2):
            logits.append(model(logits[-1][:, -1:].argmax(-1), cache=cache))
        return torch.cat(logits, 1)

    with torch.inference_mode():
        with kernel_mode("reference"):
            want = run()
        launched = _count_launches(monkeypatch)
        got = run()  # the fixture's mode: "triton"
    for name in ("_rms_norm_kernel", "_rope_kernel", "_swiglu_kernel", "_wxa16_matmul_kernel",
                 "_flash_attention_kernel", "_decode_attention_kernel"):
        assert name in launched, f"{name} was not used by the model"
    assert_close(got, want, 2e-4, 2e-4)


def test_siglip_with_padding_mask(monkeypatch):
    from edge_mmm.models.siglip import SiglipVisionConfig, SiglipVisionTransformer

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)
    model = SiglipVisionTransformer(cfg).eval().to(DEVICE)
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    patch_mask = torch.ones(2, 4, 4, dtype=torch.bool, device=DEVICE)
    patch_mask[1, 3:, :] = False
    patch_mask[1, :, 2:] = False
    with torch.inference_mode():
        with kernel_mode("reference"):
            want = model(pixels, patch_mask)
        launched = _count_launches(monkeypatch)
        got = model(pixels, patch_mask)
    assert "_flash_attention_kernel" in launched and "_gelu_tanh_kernel" in launched
    assert_close(got, want, 1e-4, 1e-4)


def test_whisper_encoder_and_decoder(monkeypatch):
    from edge_mmm.models.whisper import Whisper, WhisperConfig

    torch.manual_seed(0)
    cfg = WhisperConfig(80, 20, 32, 2, 1, 51865, 16, 32, 2, 1)
    model = Whisper(cfg).eval().to(DEVICE)
    mel = torch.randn(1, 80, 40, device=DEVICE)
    tokens = torch.tensor([[50257, 50362, 440]], device=DEVICE)

    def run():
        feats = model.encoder(mel)
        ck, cv = model.decoder.cross_kv(feats)
        sk, sv = model.empty_cache(1)
        sk, sv = sk.to(DEVICE), sv.to(DEVICE)
        logits, sk, sv = model.decoder(tokens, torch.tensor(0, device=DEVICE), ck, cv, sk, sv)
        step, _, _ = model.decoder(tokens[:, -1:], torch.tensor(3, device=DEVICE), ck, cv, sk, sv)
        return feats, torch.cat([logits, step], 1)

    with torch.inference_mode():
        with kernel_mode("reference"):
            want = run()
        launched = _count_launches(monkeypatch)
        got = run()
    assert "_flash_attention_kernel" in launched  # encoder, decoder self-attention, cross-attention prefill
    assert "_decode_attention_kernel" in launched  # cross-attention of the one-token step
    assert_close(got[0], want[0], 1e-4, 1e-4, "encoder")
    assert_close(got[1], want[1], 1e-3, 1e-4, "logits")


def test_whisper_backend_beam_group_and_front_end(monkeypatch):
    """The torch ASR backend on the kernels' device: log-mel through the log_mel kernel, cross K/V kept in
    the kernels' layout when a beam group repeats them, and logits equal to the reference code's."""
    import numpy as np

    from edge_mmm.asr.backends import TorchWhisperBackend
    from edge_mmm.asr.transcribe import padded_log_mel
    from edge_mmm.models.whisper import Whisper, WhisperConfig

    torch.manual_seed(0)
    cfg = WhisperConfig(80, 20, 32, 2, 1, 51865, 16, 32, 2, 1)
    backend = TorchWhisperBackend(Whisper(cfg).eval(), device=DEVICE)
    audio = np.random.default_rng(0).standard_normal(1200).astype(np.float32) * 0.1
    tokens = np.array([[50257, 50362, 440], [50257, 50362, 1029]])

    def run():
        mel = padded_log_mel(backend, audio)
        state = backend.new_state(backend.encode(mel[None, :, :40]), group=2)
        first = backend.step(state, tokens)
        backend.reorder(state, np.array([1, 1]))
        return mel, np.concatenate([first, backend.step(state, tokens[:, -1:])], 1), state

    with kernel_mode("reference"):
        want_mel, want, _ = run()
    launched = _count_launches(monkeypatch)
    mel, got, state = run()
    assert "_log_mel_kernel" in launched and "_decode_attention_kernel" in launched
    k = state.cross_k[0]
    assert k.shape == (2, 2, 16, 20) and k.stride(-2) == 1  # K^T view over [B, H, S, Dh] storage
    np.testing.assert_allclose(mel, want_mel, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
