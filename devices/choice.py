"""What a device profile loads: the backends, LM precision, context length and vision tiling of a model set,
with the memory plan checked before anything loads.

`choose(profile, models, overrides)` takes the profile's preferences (`default_backends` in order,
`precisions`, `default_context`, `vision_batch`), lets explicit flags (`Overrides`) win, and runs the
planner on the result: a plan that does not fit raises DeviceError with the budget and the cheapest fix
(`planner.check_fits`). Model specs come from config files / GGUF metadata, never from the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from edge_mmm.errors import InputError

from .planner import MIB, DevicePlan, PlanRequest, check_fits
from .profile import DeviceProfile
from .specs import WHISPER, spec_from_file

# The backends each modality's loader offers for a model directory (bundles: see edge_mmm.bundle).
ASR_BACKENDS = ("torch", "onnxruntime")
LM_BACKENDS = ("onnxruntime", "torch")
VISION_BACKENDS = ("torch", "onnxruntime")
WEIGHT_QUANTS = ("int4", "int8")  # weight-only LM quantization, smallest first


@dataclass(frozen=True)
class ModelSet:
    """The files to load: Whisper, and a text-only LM or a VLM (paths resolved by the caller)."""

    asr: Optional[Path] = None
    lm: Optional[Path] = None
    vlm: Optional[Path] = None
    vad: bool = False


@dataclass(frozen=True)
class Overrides:
    """Explicit flags; None leaves the choice to the profile."""

    asr_backend: Optional[str] = None
    lm_backend: Optional[str] = None
    vision_backend: Optional[str] = None
    lm_quant: Optional[str] = None  # a VLM's LM weights: int4 | int8 | float
    context: Optional[int] = None
    vision_batch: Optional[int] = None


@dataclass(frozen=True)
class RunChoice:
    """What loads, and the plan it fits in."""

    device: str
    asr_backend: Optional[str]
    lm_backend: Optional[str]
    vision_backend: Optional[str]
    lm_quant: Optional[str]  # None: float weights (a GGUF keeps its own)
    torch_device: str  # where the torch backend runs: cpu, or cuda on a GPU profile
    context: int
    vision_batch: int
    plan: DevicePlan

    def describe(self) -> str:
        """One line for the first notice of a run."""
        parts = [f"device {self.device}"]
        for name, value in (("asr", self.asr_backend), ("lm", self.lm_backend), ("vision", self.vision_backend)):
            if value is not None:
                parts.append(f"{name} {value}")
        if self.vision_backend is not None:
            parts.append(f"lm weights {self.lm_quant or 'float'}")
            parts.append(f"vision batch {self.vision_batch}")
        parts.append(f"context {self.context}")
        parts.append(f"plan {self.plan.total_bytes / MIB:,.0f} of {self.plan.budget_bytes / MIB:,.0f} MiB")
        return ", ".join(parts)


def preferred_backend(profile: DeviceProfile, offered: Tuple[str, ...]) -> str:
    """The first of the profile's backends that the loader offers (tensorrt needs a bundle's engines)."""
    for name in profile.default_backends:
        if name in offered:
            return name
    return offered[0]


def _pick(override: Optional[str], profile: DeviceProfile, offered: Tuple[str, ...], flag: str) -> str:
    if override is None:
        return preferred_backend(profile, offered)
    if override not in offered:
        raise InputError(f"{flag} must be one of {', '.join(offered)}, got {override!r}")
    return override


def _asr_spec(path: Path):
    """The Whisper spec from the checkpoint's config.json (HF) or its dims (CTranslate2: the model.bin headers,
    not its weights; openai .pt: the pickle's dims), unless the name is a known size."""
    from dataclasses import asdict

    from edge_mmm.weights.whisper_files import locate_whisper_files, read_whisper_config

    files = locate_whisper_files(path)
    if files.format == "hf":
        return spec_from_file(files.location, "asr")
    from .specs import whisper_spec_from_dims

    name = files.location.name if files.location.is_dir() else files.location.stem
    if name.lower() in WHISPER:
        return WHISPER[name.lower()]
    return whisper_spec_from_dims(asdict(read_whisper_config(path)), name)


def _lm_spec(path: Path):
    from edge_mmm.weights.gguf_lm import lm_source

    return spec_from_file(lm_source(path), "llm")


def choose(profile: DeviceProfile, models: ModelSet, overrides: Overrides = Overrides()) -> RunChoice:
    """The profile's choice for `models`, explicit overrides applied, checked against the memory plan."""
    if models.lm is not None and models.vlm is not None:
        raise InputError("give either a VLM or a text-only LM, not both")
    asr_backend = _pick(overrides.asr_backend, profile, ASR_BACKENDS, "--backend (speech)") if models.asr else None
    # the language model's runtime, text-only or the VLM's (onnxruntime on a CPU profile, torch on a GPU one)
    lm_backend = (_pick(overrides.lm_backend, profile, LM_BACKENDS,
                        "--backend (LM)" if models.lm else "--vlm-lm-backend") if models.lm or models.vlm else None)
    vision_backend = (_pick(overrides.vision_backend, profile, VISION_BACKENDS, "the vision backend (--backend / --vlm-backend)")
                      if models.vlm else None)
    if overrides.lm_quant is not None:
        lm_quant = None if overrides.lm_quant == "float" else overrides.lm_quant
        if lm_quant not in (None,) + WEIGHT_QUANTS:
            raise InputError(f"--quantize must be int4, int8 or float, got {overrides.lm_quant!r}")
    else:
        lm_quant = next((q for q in WEIGHT_QUANTS if profile.supports(q)), None) if models.vlm else None
    asr_spec = _asr_spec(models.asr) if models.asr else None
    vlm_spec = spec_from_file(models.vlm, "vlm") if models.vlm else None
    llm_spec = _lm_spec(models.lm) if models.lm else None
    lm_spec = vlm_spec.text if vlm_spec is not None else llm_spec
    context = overrides.context or profile.default_context
    if overrides.context is None and lm_spec is not None:  # the profile's context, up to the model's own
        context = min(context, lm_spec.max_context)
    vision_batch = overrides.vision_batch or profile.vision_batch
    float_quant = "fp32" if profile.activation_dtype == "fp32" else "fp16"
    if models.lm is not None:  # GGUF files keep their own blocks; planned as INT4 with fp16 scales (Q4_1)
        quant, group, zeros, scale = "int4", 32, True, "fp16"
    else:  # quant.quantize_model: group 64 for INT4, per channel (planned as 128) for INT8, fp32 scales
        quant = lm_quant or float_quant
        group, zeros, scale = (128, False, "fp32") if quant == "int8" else (64, True, "fp32")
    request = PlanRequest(
        asr=asr_spec, vlm=vlm_spec, llm=llm_spec,
        vad=models.vad, quant=quant, group_size=group, zeros=zeros, scale_dtype=scale, context=context,
        vision_batch=vision_batch if models.vlm else None,
        torch=models.vlm is not None or "torch" in (asr_backend, lm_backend, vision_backend))
    plan = check_fits(request, profile)
    torch_device = "cpu" if profile.kind == "cpu" else "cuda"
    return RunChoice(profile.id, asr_backend, lm_backend, vision_backend, lm_quant, torch_device, context,
                     vision_batch, plan)
