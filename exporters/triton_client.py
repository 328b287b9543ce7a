"""Talk to a Triton Inference Server that serves an edge-mmm repository, over HTTP or gRPC (tritonclient).

`AssistantClient(repository, url, protocol)` prepares inputs on the client the way edge-mmm does (log-mel +
Whisper prompt, chat template + tokenizer, image splitting + `<image>` token expansion), with the tokenizer and
processor files the repository carries beside its loop models, and calls:
    transcribe(audio)         -> Transcript (whisper_transcribe; one 30 s window)
    stream(messages)          -> iterator of text deltas, `.token_ids` after (lm_generate, decoupled: gRPC
                                 bidirectional stream, or HTTP `generate_stream` server-sent events)
    ask(image, question)      -> Answer (vlm_generate, streamed the same way)
    vad(chunk, state)         -> (speech probability, new state) (vad)
A server-side failure raises `TritonRequestError` carrying the server's own message.
"""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_mmm.errors import EdgeMMMError, InputError, MissingExtraError

PROTOCOLS = ("http", "grpc")


class TritonRequestError(EdgeMMMError):
    """The server answered a request with an error (its message is this error's text)."""


@dataclass
class Transcript:
    text: str
    token_ids: List[int]


@dataclass
class Answer:
    text: str
    token_ids: List[int]
    deltas: List[str] = field(default_factory=list)


class TokenStream:
    """Iterate for text deltas; `token_ids` and `text` are complete once iteration ends."""

    def __init__(self, chunks: Iterator[Tuple[str, List[int]]]):
        self._chunks, self.token_ids, self.deltas = chunks, [], []

    def __iter__(self) -> Iterator[str]:
        for text, ids in self._chunks:
            self.token_ids += ids
            self.deltas.append(text)
            yield text

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def consume(self) -> Answer:
        for _ in self:
            pass
        return Answer(self.text, self.token_ids, self.deltas)


def _client_module(protocol: str):
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be http or grpc, got {protocol!r}")
    try:
        if protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError when the [http]/[grpc] part is absent
        raise MissingExtraError(f"tritonclient.{protocol}", "dev", "talking to Triton Inference Server") from exc
    return mod


class AssistantClient:
    def __init__(self, repository: Union[str, Path], url: str, protocol: str = "http", timeout_s: float = 300.0):
        self.repository = Path(repository)
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.mod = _client_module(protocol)
        self.client = self._new_client()
        self._whisper = self._lm_tok = self._vlm = None

    def _new_client(self):
        if self.protocol == "http":
            return self.mod.InferenceServerClient(self.url, network_timeout=self.timeout_s,
                                                  connection_timeout=self.timeout_s)
        return self.mod.InferenceServerClient(self.url)

    def close(self) -> None:
        self.client.close()

    # ---------------------------------------------------------------- plumbing
    def _input(self, name: str, array: np.ndarray, dtype: str):
        t = self.mod.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    def infer(self, model: str, inputs: Mapping[str, Tuple[np.ndarray, str]], outputs: Sequence[str]
              ) -> Dict[str, np.ndarray]:
        """One request/response inference; TritonRequestError with the server's message on failure."""
        from tritonclient.utils import InferenceServerException

        ins = [self._input(k, a, d) for k, (a, d) in inputs.items()]
        outs = [self.mod.InferRequestedOutput(n) for n in outputs]
        try:
            kwargs = {"timeout": int(self.timeout_s)} if self.protocol == "http" else {
                "client_timeout": self.timeout_s}
            result = self.client.infer(model, ins, outputs=outs, **kwargs)
        except InferenceServerException as exc:
            raise TritonRequestError(f"{model}: {exc.message()}") from exc
        return {n: result.as_numpy(n) for n in outputs}

    def generate(self, model: str, inputs: Mapping[str, Tuple[np.ndarray, str]]) -> TokenStream:
        """A decoupled model's streamed responses: gRPC stream, or HTTP generate_stream (server-sent events)."""
        gen = self._grpc_stream(model, inputs) if self.protocol == "grpc" else self._http_stream(model, inputs)
        return TokenStream(gen)

    def _grpc_stream(self, model, inputs) -> Iterator[Tuple[str, List[int]]]:
        from tritonclient.utils import InferenceServerException

        results: "queue.Queue" = queue.Queue()
        client = self.mod.InferenceServerClient(self.url)  # one stream per client object
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            stream_timeout=self.timeout_s)
        try:
            client.async_stream_infer(model, [self._input(k, a, d) for k, (a, d) in inputs.items()],
                                      outputs=[self.mod.InferRequestedOutput(n) for n in ("text_output",
                                                                                          "OUTPUT_IDS")],
                                      enable_empty_final_response=True)
            while True:
                result, error = results.get(timeout=self.timeout_s)
                if error is not None:
                    msg = error.message() if isinstance(error, InferenceServerException) else str(error)
                    raise TritonRequestError(f"{model}: {msg}")
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if response.outputs:
                    text = result.as_numpy("text_output").reshape(-1)[0]
                    yield (text.decode("utf-8") if isinstance(text, bytes) else str(text),
                           result.as_numpy("OUTPUT_IDS").reshape(-1).tolist())
                if final is not None and final.bool_param:
                    return
        finally:
            client.stop_stream()
            client.close()

    def _http_stream(self, model, inputs) -> Iterator[Tuple[str, List[int]]]:
        import httpx

        body = {k: a.reshape(-1).tolist() if a.size != 1 or d == "INT64" else a.reshape(-1)[0].item()
                for k, (a, d) in inputs.items() if d != "BOOL"}
        for k, (a, d) in inputs.items():
            if d == "BOOL":
                body[k] = a.reshape(-1).astype(bool).tolist()
        url = f"http://{self.url}/v2/models/{model}/generate_stream"
        with httpx.stream("POST", url, json=body, timeout=self.timeout_s) as r:
            if r.status_code != 200:
                r.read()
                raise TritonRequestError(f"{model}: {_http_error(r.text)}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise TritonRequestError(f"{model}: {event['error']}")
                if "text_output" in event:
                    ids = event.get("OUTPUT_IDS", [])
                    yield event["text_output"], ids if isinstance(ids, list) else [ids]

    # ---------------------------------------------------------------- speech
    def _whisper_parts(self):
        if self._whisper is None:
            from edge_mmm.asr.tokenizer import WhisperTokenizer
            from edge_mmm.models.whisper import WhisperConfig

            d = self.repository / "whisper_transcribe"
            cfg = WhisperConfig(**json.loads((d / "whisper_config.json").read_text()))
            tok = WhisperTokenizer.from_file(d / "tokenizer.json", cfg.n_vocab, cfg.is_multilingual,
                                             cfg.num_languages)
            self._whisper = cfg, tok
        return self._whisper

    def transcribe(self, audio: Union[str, Path, np.ndarray], language: Optional[str] = None) -> Transcript:
        """Greedy transcription of one 30 s window without timestamps (edge-mmm's decoding rule)."""
        from edge_mmm.asr.decoding import _suppress_ids
        from edge_mmm.audio.constants import N_FRAMES, SAMPLE_RATE
        from edge_mmm.audio.io import load_audio
        from edge_mmm.audio.mel import log_mel_spectrogram, pad_or_trim

        cfg, tok = self._whisper_parts()
        wav = load_audio(audio) if not isinstance(audio, np.ndarray) else audio.astype(np.float32)
        if len(wav) > 30 * SAMPLE_RATE:
            raise InputError(f"the Triton transcription model takes one 30 s window; this audio is "
                             f"{len(wav) / SAMPLE_RATE:.1f} s (split it, e.g. at VAD pauses)")
        if tok.multilingual and language is None:
            raise InputError("a multilingual model needs language= here (no language detection on the server)")
        mel = pad_or_trim(log_mel_spectrogram(wav, cfg.n_mels), N_FRAMES).numpy()[None].astype(np.float32)
        prompt = list(tok.sot_sequence(language if tok.multilingual else None, "transcribe")) + [tok.no_timestamps]
        out = self.infer("whisper_transcribe", {
            "MEL": (mel, "FP32"), "PROMPT_IDS": (np.asarray(prompt, np.int64), "INT64"),
            "SUPPRESS_IDS": (np.asarray(_suppress_ids(tok, "-1"), np.int64), "INT64"),
            "BEGIN_SUPPRESS_IDS": (np.asarray(tok.encode(" ") + [tok.eot], np.int64), "INT64"),
            "MAX_NEW_TOKENS": (np.asarray([cfg.n_text_ctx // 2], np.int32), "INT32")}, ["TOKEN_IDS"])
        ids = out["TOKEN_IDS"].reshape(-1).tolist()
        return Transcript(tok.decode(ids).strip(), ids)

    # ---------------------------------------------------------------- text
    def lm_tokenizer(self):
        if self._lm_tok is None:
            from edge_mmm.text.tokenizer import TextTokenizer

            self._lm_tok = TextTokenizer.from_dir(self.repository / "lm_generate")
        return self._lm_tok

    def stream(self, messages: Sequence[Mapping[str, Any]], max_tokens: int = 64) -> TokenStream:
        """Chat messages -> streamed answer (the prompt is templated and tokenized here, as edge-mmm does)."""
        from edge_mmm.text.chat_template import render_chat

        tok = self.lm_tokenizer()
        text = render_chat(tok.chat_template, list(messages), True, special_tokens=tok.special_tokens)
        ids = tok.encode(text, add_special_tokens=False)
        return self.generate("lm_generate", {"INPUT_IDS": (np.asarray(ids, np.int64), "INT64"),
                                             "max_tokens": (np.asarray([max_tokens], np.int32), "INT32")})

    # ---------------------------------------------------------------- vision
    def _vlm_parts(self):
        if self._vlm is None:
            from edge_mmm.vision.processor import Idefics3ImageProcessor
            from edge_mmm.vision.prompt import Idefics3Processor
            from edge_mmm.vision.idefics3 import read_vlm_files

            files = read_vlm_files(self.repository / "vlm_generate", weights=False)
            self._vlm = files, Idefics3Processor(Idefics3ImageProcessor(files.image_processor), files.tokenizer)
        return self._vlm

    def prepare_vlm(self, messages: Sequence[Mapping[str, Any]]) -> Dict[str, Tuple[np.ndarray, str]]:
        """OpenAI-style messages with image parts -> vlm_generate's inputs (real tiles, patch masks, ids)."""
        import torch

        from edge_mmm.models.idefics3 import real_tiles
        from edge_mmm.vision.api import split_messages
        from edge_mmm.vision.processor import load_image

        files, proc = self._vlm_parts()
        tmpl, images = split_messages(messages)
        text = proc.apply_chat_template(tmpl, add_generation_prompt=True)
        inputs: Dict[str, Tuple[np.ndarray, str]] = {}
        processed = None
        if images:
            processed = proc.process_images([load_image(im) for im in images])
            pv, mask = real_tiles(torch.from_numpy(processed.pixel_values),
                                  torch.from_numpy(processed.pixel_attention_mask), files.config.vision.patch_size)
            inputs["PIXEL_VALUES"] = (pv.float().numpy(), "FP32")
            inputs["PATCH_MASK"] = (mask.bool().numpy(), "BOOL")
        ids = proc(images, text, processed=processed).input_ids[0]
        inputs["INPUT_IDS"] = (np.asarray(ids, np.int64), "INT64")
        return inputs

    def ask(self, image, question: str, max_tokens: int = 32) -> TokenStream:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]}]
        inputs = self.prepare_vlm(messages)
        inputs["max_tokens"] = (np.asarray([max_tokens], np.int32), "INT32")
        return self.generate("vlm_generate", inputs)

    # ---------------------------------------------------------------- VAD
    def vad(self, samples: np.ndarray, state: Optional[np.ndarray] = None, sample_rate: int = 16000
            ) -> Tuple[float, np.ndarray]:
        """Speech probability and the recurrent state for the next call, for one row of Silero's input: the
        64 samples of context before a 512-sample chunk, then the chunk (16 kHz), as SileroVad builds it."""
        chunk = samples
        from edge_mmm.audio.vad import VAD_STATE_SHAPE

        state = np.zeros(VAD_STATE_SHAPE, np.float32) if state is None else state
        out = self.infer("vad", {"input": (np.asarray(chunk, np.float32).reshape(1, -1), "FP32"),
                                 "state": (state, "FP32"), "sr": (np.asarray([sample_rate], np.int64), "INT64")},
                         ["output", "stateN"])
        return float(out["output"].reshape(-1)[0]), out["stateN"]


def _http_error(text: str) -> str:
    try:
        return json.loads(text).get("error", text)
    except ValueError:
        return text
