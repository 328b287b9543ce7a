"""Multilingual checkpoints (no real weights here): a tiny random multilingual Whisper, run by openai-whisper
and by us from the same state dict, on torch and on onnxruntime with the C decoder (its pack in fp32: random
weights are not fp16 values). Language probabilities (abs 1e-5) and greedy tokens must agree."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

whisper = pytest.importorskip("whisper")

from edge_mmm.asr.backends import TorchWhisperBackend  # noqa: E402
from edge_mmm.asr.decoding import DecodingOptions, decode_window, detect_language  # noqa: E402
from edge_mmm.asr.tokenizer import WhisperTokenizer  # noqa: E402
from edge_mmm.models.whisper import Whisper, WhisperConfig  # noqa: E402

CFG = WhisperConfig(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                    n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=4, n_text_layer=2)


@pytest.fixture(scope="module", params=["torch", "onnxruntime-c-decoder"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ours = Whisper(CFG).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
        ours.encoder.positional_embedding.normal_(0, 0.5)
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(CFG)))
    ref.load_state_dict(ours.state_dict(), strict=False)
    # a minimal tokenizer.json whose <|endoftext|> sits where the multilingual vocabulary puts it
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
                "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                "added_tokens": [{"id": 50257, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True}],
                "model": {"type": "WordLevel", "unk_token": "t0",
                          "vocab": {**{f"t{i}": i for i in range(50257)}, "<|endoftext|>": 50257}}}
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(json.dumps(tok_json))
    tok = WhisperTokenizer.from_file(path, CFG.n_vocab, CFG.is_multilingual, CFG.num_languages)
    if request.param == "torch":
        return TorchWhisperBackend(ours), ref.eval(), tok
    from edge_mmm.asr.backends import OnnxWhisperBackend
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx
    from edge_mmm.exporters.whisper_decoder_pack import write_decoder_pack

    out = tmp_path_factory.mktemp("onnx")
    export_whisper_onnx(ours, out, check=False, ort_fused_attention=True, dynamic_frames=True)
    write_decoder_pack(ours.decoder, out)
    backend = OnnxWhisperBackend(out, CFG, threads=2, cache_dir=tmp_path_factory.mktemp("kernel"))
    if backend.cpu_decoder is None:
        from kernel_host import kernel_missing

        kernel_missing("OnnxWhisperBackend fell back to the decoder graph")
    return backend, ref.eval(), tok


def test_special_ids_match_openai(pair):
    _, _, tok = pair
    ref = whisper.tokenizer.get_tokenizer(True, num_languages=CFG.num_languages)
    assert tok.sot == ref.sot and tok.eot == ref.eot and tok.no_timestamps == ref.no_timestamps
    assert tok.transcribe == ref.transcribe and tok.translate == ref.translate
    assert sorted(tok.language_ids.values()) == sorted(ref.all_language_tokens)
    assert all(tok.language_ids[c] == ref.to_language_token(c) for c in ref.all_language_codes)
    assert tok.sot_sequence("de", "translate") == tuple(
        whisper.tokenizer.get_tokenizer(True, num_languages=CFG.num_languages, language="de", task="translate").sot_sequence)


def test_language_detection_matches_openai(pair):
    backend, ref, tok = pair
    for seed in range(3):
        mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(seed))
        ref_tokens, ref_probs = whisper.decoding.detect_language(ref, mel)
        lang, probs = detect_language(backend, tok, backend.encode(mel.numpy()))
        assert tok.language_ids[lang] == ref_tokens.item()
        for code, p in ref_probs[0].items():
            assert probs[code] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_multilingual_greedy_matches_openai(pair, task):
    backend, ref, tok = pair
    mel = torch.randn(80, 3000, generator=torch.Generator().manual_seed(7))
    opts = whisper.DecodingOptions(task=task, language=None, without_timestamps=True, fp16=False,
                                   suppress_tokens=[], suppress_blank=False, sample_len=16)
    want = whisper.decode(ref, mel, opts)
    got = decode_window(backend, tok, backend.encode(mel[None].numpy()),
                        DecodingOptions(task=task, timestamps=False, suppress_tokens="", suppress_blank=False,
                                        sample_len=16))
    assert got.language == want.language
    assert got.tokens == want.tokens
