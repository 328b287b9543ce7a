"""Whisper checkpoint formats: HF safetensors (vs transformers), openai .pt round trip, CT2 int8 scales."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.weights.whisper import load_whisper_checkpoint, save_openai_checkpoint


def test_openai_pt_round_trip(tiny_en_ckpt, tiny_en_dir, tmp_path):
    pt = tmp_path / "tiny.en.pt"
    save_openai_checkpoint(tiny_en_ckpt, pt)
    shutil.copy(tiny_en_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    back = load_whisper_checkpoint(pt)
    assert back.format == "openai" and back.config == tiny_en_ckpt.config
    for k, v in tiny_en_ckpt.state_dict.items():
        assert torch.equal(back.state_dict[k], v), k


def test_openai_pt_without_tokenizer_is_clear(tiny_en_ckpt, tmp_path):
    pt = tmp_path / "model.pt"
    save_openai_checkpoint(tiny_en_ckpt, pt)
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_whisper_checkpoint(pt)


def test_hf_safetensors_matches_transformers(tiny_en_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=1500,
                                     max_target_positions=448)
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(tiny_en_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ckpt = load_whisper_checkpoint(tmp_path)
    assert ckpt.format == "hf"
    model = ckpt.build()
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50257, 50362, 440, 2068, 7586]])
    with torch.no_grad():
        ref = hf(input_features=mel, decoder_input_ids=tokens).logits
        ck, cv = model.decoder.cross_kv(model.encoder(mel))
        sk, sv = model.empty_cache(1)
        ours, _, _ = model.decoder(tokens, torch.tensor(0), ck, cv, sk, sv)
    assert (ours - ref).abs().max().item() < 1e-4


def test_hf_wrong_config_is_clear(tiny_en_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=128, decoder_ffn_dim=128)
    transformers.WhisperForConditionalGeneration(cfg).save_pretrained(tmp_path)
    shutil.copy(tiny_en_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["d_model"] = 96  # disagrees with the stored weights
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match="shape"):
        load_whisper_checkpoint(tmp_path).build()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json"):
        load_whisper_checkpoint(tmp_path)


def test_ct2_truncated_is_clear(tiny_en_dir, tmp_path):
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(tiny_en_dir / name, tmp_path / name)
    data = (tiny_en_dir / "model.bin").read_bytes()
    for cut in (3, 1000, len(data) // 2, len(data) - 1):
        (tmp_path / "model.bin").write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="model.bin"):
            load_whisper_checkpoint(tmp_path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_ct2_nan_weights_are_clear(tiny_en_dir, tmp_path, fraction):
    """fp16 NaNs written over a run of weight bytes: the load names the file and the tensor (it used to
    surface as an export-cache error, or as NaN logits on the torch backend)."""
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(tiny_en_dir / name, tmp_path / name)
    data = bytearray((tiny_en_dir / "model.bin").read_bytes())
    start = int(len(data) * fraction) & ~1
    data[start:start + 512] = b"\xff\x7f" * 256
    (tmp_path / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model\.bin: tensor \S+ holds NaN or infinite values"):
        load_whisper_checkpoint(tmp_path).build()


def test_ct2_garbage_is_clear(tmp_path):
    (tmp_path / "model.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError):
        load_whisper_checkpoint(tmp_path)


def test_empty_dir_is_clear(tmp_path):
    with pytest.raises(ModelFileError, match="no Whisper weights"):
        load_whisper_checkpoint(tmp_path)


def test_ct2_header_matches_full_read(tiny_en_dir):
    """The header reader sees every variable with the full reader's shape and dtype, and the scalars' values,
    and gives the loader's config: what the device planner and the onnxruntime path read instead of the weights."""
    from edge_mmm.weights.ct2 import read_ct2_header, read_ct2_model
    from edge_mmm.weights.whisper_files import read_whisper_config

    full, head = read_ct2_model(tiny_en_dir / "model.bin"), read_ct2_header(tiny_en_dir / "model.bin")
    assert head.spec_name == full.spec_name and head.aliases == full.aliases
    assert head.variables.keys() == full.variables.keys()
    for name, arr in full.variables.items():
        assert (head.variables[name].shape, head.variables[name].dtype) == (arr.shape, arr.dtype), name
        if arr.ndim == 0:
            assert head.variables[name] == arr, name
    assert read_whisper_config(tiny_en_dir) == load_whisper_checkpoint(tiny_en_dir).config


def test_ct2_header_truncated_is_clear(tiny_en_dir, tmp_path):
    from edge_mmm.weights.whisper_files import read_whisper_config

    shutil.copy(tiny_en_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    data = (tiny_en_dir / "model.bin").read_bytes()
    for cut in (0, 3, 1000, len(data) // 2, len(data) - 1):
        (tmp_path / "model.bin").write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="model.bin"):
            read_whisper_config(tmp_path)


def test_read_whisper_config_hf_and_openai(tiny_en_ckpt, tiny_en_dir, tmp_path):
    from edge_mmm.weights.whisper_files import read_whisper_config

    shutil.copy(tiny_en_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    save_openai_checkpoint(tiny_en_ckpt, tmp_path / "tiny.en.pt")
    assert read_whisper_config(tmp_path / "tiny.en.pt") == tiny_en_ckpt.config
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")  # the config alone is read
    c = tiny_en_ckpt.config
    (hf / "config.json").write_text(json.dumps({
        "model_type": "whisper", "num_mel_bins": c.n_mels, "max_source_positions": c.n_audio_ctx,
        "d_model": c.n_audio_state, "encoder_attention_heads": c.n_audio_head, "encoder_layers": c.n_audio_layer,
        "vocab_size": c.n_vocab, "max_target_positions": c.n_text_ctx, "decoder_attention_heads": c.n_text_head,
        "decoder_layers": c.n_text_layer}))
    assert read_whisper_config(hf) == c
