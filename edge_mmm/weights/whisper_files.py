"""Whisper checkpoint files without their weights (and without torch): which format a path holds, where its
tokenizer is, and its dims, read from config.json (Hugging Face) or the CTranslate2 `model.bin` headers.
The onnxruntime path and the device planner stop here; `weights/whisper.py` loads the tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edge_mmm.errors import ModelFileError
from edge_mmm.models.whisper_config import WhisperConfig
from edge_mmm.weights.ct2 import CT2Model, read_ct2_header


@dataclass
class WhisperFiles:
    format: str  # "ct2" | "hf" | "openai"
    location: Path  # the model directory (ct2, hf) or the .pt file (openai)
    source: Path  # the file whose bytes define the weights


def locate_whisper_files(path: Path) -> WhisperFiles:
    """Detect the checkpoint format of `path` (file or directory) without reading the weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        return WhisperFiles("openai", path, path)
    if path.is_file() and path.name == "model.bin":
        path = path.parent
    if path.is_dir():
        if (path / "model.bin").exists():
            return WhisperFiles("ct2", path, path / "model.bin")
        if (path / "model.safetensors").exists():
            return WhisperFiles("hf", path, path / "model.safetensors")
        if (path / "model.safetensors.index.json").exists():
            return WhisperFiles("hf", path, path / "model.safetensors.index.json")
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return WhisperFiles("openai", pts[0], pts[0])
        raise ModelFileError(f"{path}: no Whisper weights found (expected model.bin, model.safetensors "
                             f"+ config.json, or one openai-whisper .pt file)")
    raise ModelFileError(f"{path}: not a Whisper model file or directory")


def tokenizer_file_for(files: WhisperFiles) -> Path:
    directory = files.location if files.location.is_dir() else files.location.parent
    return _tokenizer_file(directory, files.source)


def _tokenizer_file(directory: Path, weights: Path) -> Path:
    tok = directory / "tokenizer.json"
    if not tok.exists():
        hint = (" (openai .pt checkpoints carry no tokenizer: put the model's Hugging Face tokenizer.json beside it)"
                if weights.suffix == ".pt" else "")
        raise ModelFileError(f"{directory}: tokenizer.json missing (needed with {weights.name}){hint}")
    return tok


def read_whisper_config(path: Path) -> WhisperConfig:
    """The dims of the checkpoint at `path` without reading its weights (an openai `.pt` keeps them inside
    the pickle: that format alone loads the checkpoint, with torch)."""
    files = locate_whisper_files(path)
    if files.format == "ct2":
        return ct2_config(read_ct2_header(files.source), files.source)
    if files.format == "hf":
        return hf_config(files.location)
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    return load_whisper_checkpoint(files.location).config


def ct2_config(ct2: CT2Model, source: Path) -> WhisperConfig:
    """WhisperConfig from a CTranslate2 Whisper's variable shapes (a full `read_ct2_model` or its header)."""
    if ct2.spec_name and ct2.spec_name != "WhisperSpec":
        raise ModelFileError(f"{source}: a CTranslate2 {ct2.spec_name} model, not a Whisper model")
    v = ct2.variables
    try:
        emb = ct2.get("decoder/embeddings/weight")
        return WhisperConfig(
            n_mels=v["encoder/conv1/weight"].shape[1], n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=v["encoder/conv1/weight"].shape[0], n_audio_head=int(v["encoder/num_heads"]),
            n_audio_layer=_count_layers(v, "encoder/layer_"), n_vocab=emb.shape[0],
            n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
            n_text_state=emb.shape[1], n_text_head=int(v["decoder/num_heads"]),
            n_text_layer=_count_layers(v, "decoder/layer_"))
    except KeyError as exc:
        raise ModelFileError(f"{source}: variable {exc.args[0]} missing") from None


def _count_layers(variables, prefix: str) -> int:
    ids = {int(m.group(1)) for k in variables if (m := re.match(re.escape(prefix) + r"(\d+)/", k))}
    return max(ids) + 1 if ids else 0


_HF_CONFIG_KEYS = {"num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx", "d_model": "n_audio_state",
                   "encoder_attention_heads": "n_audio_head", "encoder_layers": "n_audio_layer",
                   "vocab_size": "n_vocab", "max_target_positions": "n_text_ctx",
                   "decoder_attention_heads": "n_text_head", "decoder_layers": "n_text_layer"}


def hf_config(directory: Path) -> WhisperConfig:
    """WhisperConfig from a Hugging Face Whisper's config.json."""
    cfg_path = directory / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{directory}: config.json missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if raw.get("model_type") != "whisper":
        raise ModelFileError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'whisper'")
    try:
        kw = {ours: int(raw[theirs]) for theirs, ours in _HF_CONFIG_KEYS.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{cfg_path}: field {exc.args[0] if exc.args else ''} missing or not an integer") from None
    kw["n_text_state"] = kw["n_audio_state"]
    return WhisperConfig(**kw)
