"""The speech-recognition families the package runs: one entry per family.

An entry names what differs between families: how a checkpoint is recognized (without reading weights),
how its torch and onnxruntime backends are built (weights, config, tokenizer file) and how its tokenizer
loads. `load_asr` goes through this table; a new family is a models file, a weights file and one entry
here (docs/architecture.md). Today: Whisper (CTranslate2, Hugging Face and openai-whisper checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from edge_mmm.errors import ModelFileError


@dataclass(frozen=True)
class ASRFamily:
    name: str
    locate: Callable  # (path) -> checkpoint files; ModelFileError when the path is not this family's
    torch_backend: Callable  # (path, threads, device) -> (backend, config, tokenizer file)
    onnx_backend: Callable  # (path, cache_dir, precision, threads) -> (backend, config, tokenizer file)
    tokenizer: Callable  # (tokenizer file, config) -> tokenizer


def _whisper_torch(path: Path, threads: int, device: str) -> Tuple:
    from edge_mmm.asr.backends import TorchWhisperBackend
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    ckpt = load_whisper_checkpoint(path)
    return TorchWhisperBackend(ckpt.build(), threads, device), ckpt.config, ckpt.tokenizer_file


def _whisper_onnx(path: Path, cache_dir: Optional[Path], precision: str, threads: int) -> Tuple:
    from edge_mmm.asr.api import export_on_first_use, onnxruntime_graphs
    from edge_mmm.asr.backends import OnnxWhisperBackend

    cfg, tok_file, onnx_dir = export_on_first_use(path, cache_dir, precision)
    return (OnnxWhisperBackend(onnxruntime_graphs(onnx_dir, cache_dir, precision), cfg, threads, cache_dir),
            cfg, tok_file)


def _whisper_tokenizer(tok_file: Path, cfg):
    from edge_mmm.asr.tokenizer import WhisperTokenizer

    return WhisperTokenizer.from_file(tok_file, cfg.n_vocab, cfg.is_multilingual, cfg.num_languages)


def _whisper_locate(path: Path):
    from edge_mmm.weights.whisper_files import locate_whisper_files

    return locate_whisper_files(path)


WHISPER = ASRFamily("whisper", _whisper_locate, _whisper_torch, _whisper_onnx, _whisper_tokenizer)
FAMILIES = (WHISPER,)


def asr_family(path: Path) -> ASRFamily:
    """The family whose checkpoint `path` is; otherwise the first family's error (it names what it expected)."""
    first: Optional[ModelFileError] = None
    for family in FAMILIES:
        try:
            family.locate(path)
            return family
        except ModelFileError as exc:
            first = first or exc
    raise first
