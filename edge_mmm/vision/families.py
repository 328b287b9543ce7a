"""The VLM families the package runs, by config.json `model_type`: one entry per family.

An entry names what differs between families: how the checkpoint loads (model + run-time files), the
prompt processor (chat template -> image-token expansion -> ids, images -> tiles) and the position scheme
the LM uses over text and image tokens. `VisionLanguageModel`, the live runtime and the CLI go through
this table; a new family is a models file, a weights file and one entry here (docs/architecture.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from edge_mmm.errors import ModelFileError

POSITIONS = ("rope-1d",)  # rope-1d: positions 0..n-1 over the whole sequence, image tokens included


@dataclass(frozen=True)
class VLMFamily:
    name: str
    model_types: Tuple[str, ...]  # config.json model_type values of this family
    load: Callable  # (root, dtype=, quantize=) -> (model, files)
    read_files: Callable  # (root, weights=) -> files (config, tokenizer, image processor settings)
    processor: Callable  # (files) -> prompt processor: apply_chat_template, process_images, __call__
    positions: str = "rope-1d"

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"VLM family {self.name}: unknown position scheme {self.positions!r}")


def _idefics3_processor(files):
    from edge_mmm.vision.processor import Idefics3ImageProcessor
    from edge_mmm.vision.prompt import Idefics3Processor

    return Idefics3Processor(Idefics3ImageProcessor(files.image_processor), files.tokenizer)


def _idefics3_load(root, **kwargs):
    from edge_mmm.vision.idefics3 import load_idefics3

    return load_idefics3(root, **kwargs)


def _idefics3_files(root, weights: bool = True):
    from edge_mmm.vision.idefics3 import read_vlm_files

    return read_vlm_files(root, weights)


IDEFICS3 = VLMFamily("idefics3", ("idefics3", "smolvlm"), _idefics3_load, _idefics3_files, _idefics3_processor)
FAMILIES: Dict[str, VLMFamily] = {t: f for f in (IDEFICS3,) for t in f.model_types}


def model_type(root: Path) -> Optional[str]:
    """config.json's model_type of a model directory, or None (a GGUF file, no config)."""
    cfg = Path(root) / "config.json"
    if not (Path(root).is_dir() and cfg.is_file()):
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {cfg}: {exc}") from exc


def vlm_family(root: Path) -> Optional[VLMFamily]:
    """The family of a VLM directory, or None when it is not a VLM this package runs."""
    return FAMILIES.get(model_type(root) or "")


def model_kind(path: Path) -> str:
    """"vlm" for a directory of a registered VLM family, else "lm" (a GGUF file, an LM directory)."""
    return "vlm" if vlm_family(path) is not None else "lm"
