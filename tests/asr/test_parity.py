"""Our Whisper vs openai-whisper on the same weights (the shipped tiny.en, CTranslate2 format).

Tolerances: log-mel max abs error < 1e-4; encoder output max abs error < 1e-4 (torch) and < 1e-3 (ONNX,
different kernels); greedy and beam-search token sequences identical on every clip, for the onnxruntime decoder graph and for the
decoder trunk + our C output projection over the fp16 table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

whisper = pytest.importorskip("whisper")

from edge_mmm.asr.backends import OnnxWhisperBackend, TorchWhisperBackend  # noqa: E402
from edge_mmm.asr.decoding import DecodingOptions, decode_window  # noqa: E402
from edge_mmm.asr.tokenizer import WhisperTokenizer  # noqa: E402
from edge_mmm.audio.constants import N_FRAMES, N_SAMPLES  # noqa: E402
from edge_mmm.audio.mel import log_mel_spectrogram, log_mel_spectrogram_np, pad_or_trim  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_en_ckpt):
    cfg = tiny_en_ckpt.config
    return WhisperTokenizer.from_file(tiny_en_ckpt.tokenizer_file, cfg.n_vocab, cfg.is_multilingual, cfg.num_languages)


@pytest.fixture(scope="module")
def torch_backend(tiny_en_ckpt):
    return TorchWhisperBackend(tiny_en_ckpt.build())


@pytest.fixture(scope="module", params=["decoder-graph", "c-decoder"])
def onnx_backend(request, tiny_en_ckpt, tmp_path_factory):
    """What load_asr caches: the fused-attention export, saved as onnxruntime optimized it (weights beside);
    "c-decoder": with the decoder pack beside it, so the decoder runs on edge-mmm's C kernel over the
    checkpoint's fp16 weights (the default on x86), "decoder-graph": the decoder graph on onnxruntime (int8
    exports, hosts without the kernel)."""
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx
    from edge_mmm.exporters.whisper_decoder_pack import write_decoder_pack
    from edge_mmm.models.whisper_config import DECODER_FILE, ENCODER_FILE
    from edge_mmm.runners.ort_session import save_optimized_onnx

    raw, out = tmp_path_factory.mktemp("onnx"), tmp_path_factory.mktemp("onnx-optimized")
    # what load_asr exports; the check runs a 10 s input through the dynamic frame axis
    model = tiny_en_ckpt.build()
    check = export_whisper_onnx(model, raw, ort_fused_attention=True, dynamic_frames=True)
    print(f"ONNX export check: encoder max abs err {check.encoder_max_abs_err:.2e}, "
          f"decoder logits max abs err {check.decoder_max_abs_err:.2e}")
    assert check.encoder_max_abs_err < 1e-3 and check.decoder_max_abs_err < 1e-3
    for name in (ENCODER_FILE, DECODER_FILE):
        save_optimized_onnx(raw / name, out / name, name)
    if request.param == "c-decoder":
        write_decoder_pack(model.decoder, out)
    backend = OnnxWhisperBackend(out, tiny_en_ckpt.config, threads=2, cache_dir=tmp_path_factory.mktemp("kernel"))
    assert backend.short_mel
    if request.param == "c-decoder":
        if backend.cpu_decoder is None:
            from kernel_host import kernel_missing

            kernel_missing("OnnxWhisperBackend fell back to the decoder graph")
        # the checkpoint's own fp16 values, exactly
        assert backend.cpu_decoder._arrays["blocks.0.fc1.w"].dtype == np.float16
        assert backend.cpu_decoder._arrays["table"].dtype == np.float16
    else:
        assert backend.cpu_decoder is None
    return backend


@pytest.fixture(scope="module")
def mels(speech_clips):
    """The 30 s window mel of each clip, from openai-whisper's own front end (the shared input)."""
    return [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a))) for _, _, a in speech_clips]


def test_log_mel_matches_openai(speech_clips):
    for _, _, audio in speech_clips:
        for n_mels in (80, 128):
            ref = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels=n_mels, padding=whisper.audio.N_SAMPLES)
            ours = log_mel_spectrogram(audio, n_mels=n_mels, padding=whisper.audio.N_SAMPLES)
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() < 1e-4
            host = log_mel_spectrogram_np(audio, n_mels=n_mels, padding=whisper.audio.N_SAMPLES)
            assert host.dtype == np.float32 and host.shape == tuple(ref.shape)
            assert np.abs(host - ref.numpy()).max() < 1e-4
            assert np.abs(host - ref.numpy()).mean() < 1e-6


def test_log_mel_np_odd_lengths_and_errors():
    from edge_mmm.errors import InputError

    rng = np.random.default_rng(0)
    for n in (201, 401, 1601, 16000 + 37):
        audio = rng.standard_normal(n).astype(np.float32) * 0.1
        ref = whisper.log_mel_spectrogram(torch.from_numpy(audio))
        host = log_mel_spectrogram_np(audio)
        assert host.shape == tuple(ref.shape), n
        assert np.abs(host - ref.numpy()).max() < 1e-4, n
    with pytest.raises(InputError):
        log_mel_spectrogram_np(np.zeros(200, np.float32))
    with pytest.raises(InputError):
        log_mel_spectrogram_np(np.zeros((2, 1600), np.float32))


def test_tokenizer_specials_match_openai(tokenizer):
    ref = whisper.tokenizer.get_tokenizer(False)
    assert tokenizer.non_speech_tokens == ref.non_speech_tokens
    for name in ("sot", "eot", "no_timestamps", "timestamp_begin", "no_speech", "sot_prev", "transcribe"):
        assert getattr(tokenizer, name) == getattr(ref, name), name
    for text in ["Hello world, it's 3 o'clock.", " naïve café — 42%", "  two  spaces"]:
        assert tokenizer.encode(text) == ref.encode(text)


def test_encoder_matches_openai(openai_model, torch_backend, onnx_backend, mels):
    for mel in mels[:3]:
        with torch.no_grad():
            ref = openai_model.encoder(mel[None])
            ours = torch_backend.model.encoder(mel[None])
            # K^T per layer in the decoder's layout [L, B, H, Dh, S]
            h = openai_model.dims.n_text_head
            ref_k = torch.stack([b.cross_attn.key(ref).unflatten(-1, (h, -1)).permute(0, 2, 3, 1)
                                 for b in openai_model.decoder.blocks])
        assert (ours - ref).abs().max().item() < 1e-4
        onnx_k, _ = onnx_backend.encode(mel[None].numpy())
        assert np.abs(np.stack(onnx_k) - ref_k.numpy()).max() < 1e-3


@pytest.mark.parametrize("timestamps", [False, pytest.param(True, marks=pytest.mark.slow)])  # CI time: [True] under -m slow
def test_greedy_tokens_identical(openai_model, tokenizer, torch_backend, onnx_backend, mels, timestamps):
    opts = whisper.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=False)
    ours_opts = DecodingOptions(language="en", timestamps=timestamps)
    for i, mel in enumerate(mels):
        ref = whisper.decode(openai_model, mel, opts).tokens
        got = decode_window(torch_backend, tokenizer, torch_backend.encode(mel[None].numpy()), ours_opts).tokens
        assert got == ref, f"clip {i}: torch tokens differ"
        got_onnx = decode_window(onnx_backend, tokenizer, onnx_backend.encode(mel[None].numpy()), ours_opts).tokens
        assert got_onnx == ref, f"clip {i}: onnxruntime tokens differ"


@pytest.mark.parametrize("timestamps", [False, pytest.param(True, marks=pytest.mark.slow)])  # CI time: [True] under -m slow
def test_greedy_tokens_identical_from_our_front_end(openai_model, tokenizer, torch_backend, onnx_backend,
                                                     speech_clips, mels, timestamps):
    """The whole CPU path as transcribe runs it: our numpy log-mel (not openai's) -> both backends -> the
    same tokens as openai-whisper on its own mel."""
    opts = whisper.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=False)
    ours_opts = DecodingOptions(language="en", timestamps=timestamps)
    for i, ((_, _, audio), ref_mel) in enumerate(zip(speech_clips, mels)):
        ref = whisper.decode(openai_model, ref_mel, opts).tokens
        mel = pad_or_trim(log_mel_spectrogram_np(audio, padding=N_SAMPLES), N_FRAMES)[None]
        for backend in (torch_backend, onnx_backend):
            got = decode_window(backend, tokenizer, backend.encode(mel), ours_opts).tokens
            assert got == ref, f"clip {i}: {backend.name} tokens from our log-mel differ"


def test_beam_search_tokens_identical(openai_model, tokenizer, onnx_backend, mels):
    opts = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, beam_size=5)
    ours_opts = DecodingOptions(language="en", timestamps=False, beam_size=5)
    for i, mel in enumerate(mels[:4]):
        ref = whisper.decode(openai_model, mel, opts)
        got = decode_window(onnx_backend, tokenizer, onnx_backend.encode(mel[None].numpy()), ours_opts)
        assert got.tokens == ref.tokens, f"clip {i}: beam-search tokens differ"
        assert got.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-3)
