"""Text side of the Idefics3 processor: chat template -> `<image>` expansion -> token ids.

`Idefics3Processor.__call__(images, text)` equals transformers' `Idefics3Processor(images=..., text=...)`
for one prompt: the same `input_ids` (tokenized with the model's tokenizer.json, special tokens as the
tokenizer's post-processor adds them) and the same `pixel_values` / `pixel_attention_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from edge_mmm.errors import InputError
from edge_mmm.text.chat_template import render_chat
from edge_mmm.text.tokenizer import TextTokenizer
from edge_mmm.vision.processor import (IMAGE_TOKEN, Idefics3ImageProcessor, ImageLike, ImageProcessorConfig,
                                       ProcessedImages, expand_image_tokens)


@dataclass
class VLMInputs:
    input_ids: np.ndarray  # (1, T) int64
    images: Optional[ProcessedImages]  # None for a text-only prompt
    prompt: str  # the expanded text that was tokenized


class Idefics3Processor:
    """Images + text -> model inputs (see module docstring)."""

    def __init__(self, image_processor: Idefics3ImageProcessor, tokenizer: TextTokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_len = image_processor.config.image_seq_len

    @classmethod
    def from_dir(cls, cfg: ImageProcessorConfig, model_dir: Path) -> "Idefics3Processor":
        """Image settings + the model directory's tokenizer.json / chat template."""
        return cls(Idefics3ImageProcessor(cfg), TextTokenizer.from_dir(model_dir))

    def apply_chat_template(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Messages whose image parts are `{"type": "image"}` -> prompt text with one `<image>` each."""
        return render_chat(self.tokenizer.chat_template, messages, add_generation_prompt,
                           special_tokens=self.tokenizer.special_tokens)

    def process_images(self, images: Sequence[ImageLike]) -> ProcessedImages:
        return self.image_processor(images)

    def __call__(self, images: Sequence[ImageLike], text: str,
                 processed: Optional[ProcessedImages] = None) -> VLMInputs:
        """One prompt with one `<image>` per image; `processed` skips re-processing known images."""
        n = text.count(IMAGE_TOKEN)
        if processed is None and images:
            processed = self.image_processor(images)
        if processed is None:
            if n:
                raise InputError(f"the prompt has {n} {IMAGE_TOKEN} placeholders but no images were given")
            prompt = text
        else:
            prompt = expand_image_tokens(text, processed.rows, processed.cols, self.image_seq_len)
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        return VLMInputs(np.asarray([ids], dtype=np.int64), processed, prompt)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
