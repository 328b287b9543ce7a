"""Long-form transcription: slide 30 s windows over the log-mel, seeking by predicted timestamps, with
temperature fallback and no-speech skipping, as openai-whisper's `transcribe()`. Segments stream out.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge_mmm.asr.decoding import DecodingOptions, DecodingResult, decode_window, detect_language
from edge_mmm.asr.tokenizer import WhisperTokenizer
from edge_mmm.audio.constants import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, TIME_PRECISION
from edge_mmm.audio.mel import log_mel_spectrogram_np, pad_or_trim
from edge_mmm.errors import InputError


@dataclass
class TranscribeOptions:
    task: str = "transcribe"
    language: Optional[str] = None
    beam_size: int = 1
    best_of: int = 5
    patience: float = 1.0
    timestamps: bool = True
    temperatures: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback ladder; (0.0,) disables it
    compression_ratio_threshold: Optional[float] = 2.4
    logprob_threshold: Optional[float] = -1.0
    no_speech_threshold: Optional[float] = 0.6
    condition_on_previous_text: bool = False
    # text the first window is conditioned on (names, spellings, style), as openai-whisper's initial_prompt:
    # its tokens precede the first window's; later windows see it only with condition_on_previous_text
    initial_prompt: Optional[str] = None
    seed: int = 0
    # encoder positions (20 ms each) kept after the audio of a window shorter than 30 s, the rest cut
    # (whisper.cpp's audio_ctx); None: every window padded to 30 s. Backends without `short_mel` ignore it.
    audio_ctx_margin: Optional[int] = None

    def __post_init__(self):
        if self.language is not None:
            self.language = self.language.strip().lower()
        if self.audio_ctx_margin is not None and self.audio_ctx_margin < 0:
            raise InputError(f"TranscribeOptions.audio_ctx_margin must be >= 0 or None, got {self.audio_ctx_margin}")


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: List[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _decode_with_fallback(backend, tok, audio, opts: TranscribeOptions, language: str, prompt,
                          sample_len: Optional[int] = None, draft: Sequence[int] = ()) -> DecodingResult:
    result = None
    for t in opts.temperatures:
        dopts = DecodingOptions(task=opts.task, language=language, temperature=t,
                                beam_size=opts.beam_size if t == 0 else 1,
                                best_of=opts.best_of if t > 0 else 1, patience=opts.patience,
                                timestamps=opts.timestamps, seed=opts.seed, sample_len=sample_len)
        result = decode_window(backend, tok, audio, dopts, prompt, draft)
        too_repetitive = (opts.compression_ratio_threshold is not None
                          and compression_ratio(result.text) > opts.compression_ratio_threshold)
        too_unlikely = opts.logprob_threshold is not None and result.avg_logprob < opts.logprob_threshold
        silent = opts.no_speech_threshold is not None and result.no_speech_prob > opts.no_speech_threshold
        if not too_repetitive and (not too_unlikely or silent):
            break
    return result


def transcribe_audio(backend, tok: WhisperTokenizer, audio: np.ndarray, opts: TranscribeOptions,
                     on_progress: Optional[Callable[[float], None]] = None, draft: Sequence[int] = ()
                     ) -> Tuple[str, Iterator[Segment]]:
    """Return (language, generator of Segments) for a 16 kHz mono waveform. `draft`: the tokens the first
    window probably decodes to (`decode_window`: checked in one decoder call, the result unchanged)."""
    tok.sot_sequence(opts.language, opts.task)  # an unknown language or task fails here, before any work
    mel = padded_log_mel(backend, audio)
    content_frames = mel.shape[-1] - N_FRAMES
    language = opts.language
    if language is None:
        if tok.multilingual:
            first = pad_or_trim(mel[:, :N_FRAMES], N_FRAMES)[None]
            language = detect_language(backend, tok, backend.encode(first))[0]
        else:
            language = "en"
    return language, _segments(backend, tok, mel, content_frames, opts, language, on_progress, draft)


def padded_log_mel(backend, audio: np.ndarray) -> np.ndarray:
    """Log-mel of `audio` plus 30 s of zeros, computed where the backend's model runs (`backend.device`):
    numpy for a backend on host arrays (device None: onnxruntime, which runs without torch), else
    `kernels.log_mel` on the torch device (our Triton kernel on CUDA, openai's torch ops on the CPU)."""
    if backend.device is None:
        return log_mel_spectrogram_np(audio, backend.config.n_mels, padding=N_SAMPLES)
    import torch

    from edge_mmm import kernels

    wav = torch.as_tensor(np.ascontiguousarray(audio, dtype=np.float32), device=backend.device)
    return kernels.log_mel(wav, backend.config.n_mels, padding=N_SAMPLES).cpu().numpy()


def window_frames(backend, segment_size: int, opts: TranscribeOptions) -> int:
    """Mel frames the encoder gets for `segment_size` frames of audio: 3000, or with `audio_ctx_margin` on a
    backend that takes short input, the audio plus the margin (even: the encoder's conv has stride 2)."""
    if opts.audio_ctx_margin is None or not getattr(backend, "short_mel", False):
        return N_FRAMES
    return min(N_FRAMES, 2 * (-(-segment_size // 2) + opts.audio_ctx_margin))


def _segments(backend, tok, mel, content_frames, opts, language, on_progress, draft=()) -> Iterator[Segment]:
    input_stride = N_FRAMES // backend.config.n_audio_ctx
    seek = 0
    all_tokens: List[int] = (tok.encode(" " + opts.initial_prompt.strip())
                              if opts.initial_prompt is not None else [])
    prompt_reset = 0
    while seek < content_frames:
        time_offset = seek * HOP_LENGTH / SAMPLE_RATE
        segment_size = min(N_FRAMES, content_frames - seek)
        frames = window_frames(backend, segment_size, opts)
        segment = mel[:, seek : seek + segment_size]  # numpy: the onnxruntime path runs without torch
        prompt = all_tokens[prompt_reset:]  # empty after the first window unless conditioning on previous text
        # a loop in a short window stops after what the audio could hold (~16 tokens a second is fast speech)
        cap = None if frames == N_FRAMES else 16 + -(-segment_size * 16 * HOP_LENGTH // SAMPLE_RATE)
        result = _decode_with_fallback(backend, tok, backend.encode(pad_or_trim(segment, frames)[None]),
                                       opts, language, prompt, cap, draft if seek == 0 else ())
        if frames < N_FRAMES and compression_ratio(result.text) > (opts.compression_ratio_threshold or 2.4):
            # a short window can send the decoder into a loop (whisper.cpp's audio_ctx does the same):
            # decode this window again as the model was trained, padded to 30 s
            result = _decode_with_fallback(backend, tok, backend.encode(pad_or_trim(segment, N_FRAMES)[None]),
                                           opts, language, prompt)
        tokens = np.array(result.tokens, dtype=np.int64)
        if opts.no_speech_threshold is not None and result.no_speech_prob > opts.no_speech_threshold and not (
                opts.logprob_threshold is not None and result.avg_logprob > opts.logprob_threshold):
            seek += segment_size
            _report(on_progress, seek, content_frames)
            continue
        current: List[Segment] = []

        def add(start: float, end: float, toks: np.ndarray) -> None:
            text = tok.decode(toks)
            keep = start != end and text.strip() != ""
            current.append(Segment(round(start, 3), round(end, 3), text if keep else "",
                                   [int(t) for t in toks] if keep else [], result.avg_logprob,
                                   result.no_speech_prob, result.temperature))

        is_ts = tokens >= tok.timestamp_begin
        single_timestamp_ending = is_ts[-2:].tolist() == [False, True]
        consecutive = np.where(is_ts[:-1] & is_ts[1:])[0] + 1
        if len(consecutive) > 0:
            slices = consecutive.tolist()
            if single_timestamp_ending:
                slices.append(len(tokens))
            last = 0
            for cur in slices:
                sl = tokens[last:cur]
                add(time_offset + (sl[0] - tok.timestamp_begin) * TIME_PRECISION,
                    time_offset + (sl[-1] - tok.timestamp_begin) * TIME_PRECISION, sl)
                last = cur
            if single_timestamp_ending:
                seek += segment_size
            else:
                seek += int(tokens[last - 1] - tok.timestamp_begin) * input_stride
        else:
            duration = segment_size * HOP_LENGTH / SAMPLE_RATE
            stamps = tokens[is_ts]
            if len(stamps) > 0 and stamps[-1] != tok.timestamp_begin:
                duration = (stamps[-1] - tok.timestamp_begin) * TIME_PRECISION
            add(time_offset, time_offset + duration, tokens)
            seek += segment_size
        for seg in current:
            all_tokens.extend(seg.tokens)
            if seg.text:
                yield seg
        if not opts.condition_on_previous_text or result.temperature > 0.5:
            prompt_reset = len(all_tokens)
        _report(on_progress, seek, content_frames)


def _report(cb, seek: int, total: int) -> None:
    if cb is not None:
        cb(min(seek, total) * HOP_LENGTH / SAMPLE_RATE)
