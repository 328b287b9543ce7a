"""Load a Hugging Face SmolVLM / Idefics3 checkpoint directory into our `Idefics3ForConditionalGeneration`.

Files: config.json, model.safetensors (or model.safetensors.index.json + shards), tokenizer.json, and the
processor settings (preprocessor_config.json and/or processor_config.json; transformers 5 nests the image
processor inside processor_config.json). This module reads files: configs, the processor settings as a
dict and the weights (the text model's go through the LM loader, `weights/hf_lm.py`). Assembling the
tokenizer and the image processor is the vision family's job (`edge_mmm.vision.idefics3`). Every file is
checked before any weight is read; a missing or unreadable one is a ModelFileError naming it. The LM can
be weight-only quantized (INT4/INT8, docs/quantization.md); the vision tower stays float.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.idefics3 import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Vision
from edge_mmm.models.llama import build_llama
from edge_mmm.models.siglip import SiglipVisionConfig
from edge_mmm.weights.hf_lm import hf_state_to_llama, lm_config_from_hf, read_safetensors, safetensors_files

VISION_PREFIX = "model.vision_model."
CONNECTOR_PREFIX = "model.connector.modality_projection."
TEXT_PREFIXES = ("model.text_model.", "model.language_model.")  # transformers 4.x / 5.x spelling
REQUIRED_FILES = ("config.json", "tokenizer.json")


@dataclass
class VLMCheckpoint:
    """What an Idefics3 checkpoint directory's files say, before tokenizer and processor are assembled."""

    root: Path
    config: Idefics3Config
    processor: Dict  # image processor settings (preprocessor_config.json, overlaid by processor_config.json)
    image_seq_len: int
    raw_config: Dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFileError(f"model file {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"model file {path} is not valid JSON ({exc})") from exc


def idefics3_config_from_hf(d: dict, where: str = "config.json") -> Idefics3Config:
    """config.json of an Idefics3ForConditionalGeneration -> our config."""
    if d.get("model_type") not in ("idefics3", "smolvlm"):
        raise ModelFileError(f"{where}: model_type {d.get('model_type')!r} is not idefics3/smolvlm")
    text = dict(d.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in d:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    vision = d.get("vision_config") or {}
    if vision.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
        raise ModelFileError(f"{where}: vision hidden_act {vision.get('hidden_act')!r} is not supported")
    return Idefics3Config(vision=SiglipVisionConfig.from_dict(vision), text=lm_config_from_hf(text, where),
                          scale_factor=int(d.get("scale_factor", 2)),
                          image_token_id=int(d.get("image_token_id", 128257)))


def read_vlm_checkpoint(root, weights: bool = True) -> VLMCheckpoint:
    """Check every needed file exists and parse the configs; no weights are read.
    `weights=False`: the weights live elsewhere (an export bundle), so safetensors are not required."""
    root = Path(root)
    if not root.is_dir():
        raise ModelFileError(f"model directory {root} does not exist")
    for name in REQUIRED_FILES:
        if not (root / name).is_file():
            raise ModelFileError(f"model file {root / name} is missing")
    raw = _read_json(root / "config.json")
    cfg = idefics3_config_from_hf(raw, str(root / "config.json"))
    if weights:
        safetensors_files(root)
    proc: dict = {}
    image_seq_len = None
    if (root / "processor_config.json").is_file():
        pc = _read_json(root / "processor_config.json")
        image_seq_len = pc.get("image_seq_len")
        proc = pc.get("image_processor") or {}
    if (root / "preprocessor_config.json").is_file():
        proc = {**_read_json(root / "preprocessor_config.json"), **proc}
    if not proc:
        raise ModelFileError(f"model file {root / 'preprocessor_config.json'} is missing (no image processor "
                             f"settings in processor_config.json either)")
    image_seq_len = int(image_seq_len if image_seq_len is not None else cfg.image_seq_len)
    if image_seq_len != cfg.image_seq_len:
        raise ModelFileError(f"{root}: processor image_seq_len={image_seq_len} disagrees with config.json "
                             f"({cfg.image_seq_len} tokens per tile)")
    return VLMCheckpoint(root, cfg, proc, image_seq_len, raw)


def split_state(tensors: Dict[str, torch.Tensor], cfg: Idefics3Config, where: str
                ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """HF tensors -> (vision state for `Idefics3Vision`, LM state for `build_llama`)."""
    vision = {}
    for key, value in tensors.items():
        if key.startswith(VISION_PREFIX):
            vision["vision_model." + key[len(VISION_PREFIX):]] = value
        elif key.startswith(CONNECTOR_PREFIX):
            vision["connector." + key[len(CONNECTOR_PREFIX):]] = value
    prefix = next((p for p in TEXT_PREFIXES if any(k.startswith(p) for k in tensors)), TEXT_PREFIXES[0])
    return vision, hf_state_to_llama(tensors, cfg.text, prefix=prefix, where=where)


def load_idefics3_weights(root: Path, cfg: Idefics3Config, dtype: torch.dtype = torch.float32,
                          quantize: Optional[str] = None, group_size: int = 64) -> Idefics3ForConditionalGeneration:
    """Build the model from a checked checkpoint dir (`read_vlm_checkpoint`); `quantize` in
    (None, 'int4', 'int8') applies to the LM only."""
    if quantize not in (None, "int4", "int8"):
        raise ModelFileError(f"unknown quantization {quantize!r} (use int4 or int8)")
    tensors = read_safetensors(safetensors_files(root))
    if "lm_head.weight" not in tensors:  # a tied head is not saved (configs disagree on where the flag lives)
        cfg.text.tie_word_embeddings = True
    vis_state, lm_state = split_state(tensors, cfg, str(root))
    lm = build_llama(cfg.text, lm_state, dtype=dtype)
    with torch.device("meta"):
        vision = Idefics3Vision(cfg)
    vis_state = {k: v.to(dtype) for k, v in vis_state.items()}
    missing, unexpected = vision.load_state_dict(vis_state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelFileError(f"{root}: vision weights do not match config.json: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    model = Idefics3ForConditionalGeneration(cfg, vision=vision, lm=lm)
    quantize_vlm_lm(model, quantize, group_size)
    return model.eval()


def quantize_vlm_lm(model: Idefics3ForConditionalGeneration, quantize: Optional[str], group_size: int = 64) -> None:
    """Weight-only quantization of the VLM's LM in place (its head stays float): 'int4' (asymmetric, groups of
    `group_size`), 'int8' (symmetric, per channel) or None (nothing)."""
    if quantize not in (None, "int4", "int8"):
        raise ModelFileError(f"unknown quantization {quantize!r} (use int4 or int8)")
    if quantize is not None:
        from edge_mmm.quant.quantize import quantize_model

        bits = 4 if quantize == "int4" else 8
        quantize_model(model.lm, bits=bits, group_size=group_size if bits == 4 else None, symmetric=bits == 8)
