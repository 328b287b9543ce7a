"""The SmolVLM / Idefics3 family at run time: its tokenizer and image processor assembled from the checkpoint's
files (read by `edge_mmm.weights.idefics3`), checked against each other, and `load_idefics3` (model + files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.idefics3 import Idefics3Config, Idefics3ForConditionalGeneration
from edge_mmm.text.tokenizer import TextTokenizer
from edge_mmm.vision.processor import END_OF_UTTERANCE_TOKEN, IMAGE_TOKEN, ImageProcessorConfig
from edge_mmm.weights.idefics3 import load_idefics3_weights, read_vlm_checkpoint


@dataclass
class VLMFiles:
    """Everything besides the weights that a VLM needs at run time."""

    root: Path
    config: Idefics3Config
    image_processor: ImageProcessorConfig
    tokenizer: TextTokenizer
    raw_config: Dict = field(default_factory=dict)


def read_vlm_files(root, weights: bool = True) -> VLMFiles:
    """Check every needed file exists and parse configs + tokenizer; no weights are read.
    `weights=False`: the weights live elsewhere (an export bundle), so safetensors are not required."""
    ck = read_vlm_checkpoint(root, weights)
    root, cfg, raw = ck.root, ck.config, ck.raw_config
    ipc = ImageProcessorConfig.from_dict(ck.processor, image_seq_len=ck.image_seq_len)
    if ipc.max_image_size != cfg.vision.image_size:
        raise ModelFileError(f"{root}: processor max_image_size={ipc.max_image_size} disagrees with the vision "
                             f"image_size={cfg.vision.image_size} in config.json")
    tok = TextTokenizer.from_dir(root)
    if tok.token_id(IMAGE_TOKEN) != cfg.image_token_id:
        raise ModelFileError(f"{root / 'tokenizer.json'}: {IMAGE_TOKEN} has id {tok.token_id(IMAGE_TOKEN)}, "
                             f"config.json says image_token_id={cfg.image_token_id}")
    # the end-of-turn token and the text model's eos stop generation too
    stops = set(tok.stop_token_ids)
    eos = (raw.get("text_config") or {}).get("eos_token_id")
    stops.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    if tok.token_id(END_OF_UTTERANCE_TOKEN) is not None:
        stops.add(tok.token_id(END_OF_UTTERANCE_TOKEN))
    tok.stop_token_ids = sorted(stops)
    return VLMFiles(root, cfg, ipc, tok, raw)


def load_idefics3(root, dtype: torch.dtype = torch.float32, quantize: Optional[str] = None,
                  group_size: int = 64) -> Tuple[Idefics3ForConditionalGeneration, VLMFiles]:
    """Build the model from a checkpoint dir; `quantize` in (None, 'int4', 'int8') applies to the LM only."""
    files = read_vlm_files(root)
    model = load_idefics3_weights(files.root, files.config, dtype, quantize, group_size)
    return model, files
