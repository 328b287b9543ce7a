"""Memory planner: weights + KV cache + activations + engine workspace + runtime overhead for a model set
on a device, decided before anything is loaded.

Method (docs/devices.md has the derivation and the CPU validation):
- weights: parameter counts from architecture dims (`specs.py`) x bytes per weight. LM linears use the
  packed layout of docs/quantization.md (INT4: 4 bit codes + a scale, and an offset when `zeros`, per
  `group_size` weights; INT8: 8 bit codes + a scale per group); scales fp16 by default (GGUF's own,
  kept by the loader on CPU too; `quant.quantize_model` uses fp32: `scale_dtype`). The token embedding
  and an untied LM head stay dense in the activation dtype (the GGUF loader dequantizes the Q8_0 table
  once for the lookup; `quantize_model` skips the head). Norms stay in the activation dtype.
- KV cache: LM `2 x layers x kv_heads x head_dim x context`; Whisper self-attention KV over its 448
  text positions per beam plus the cross-attention KV of one 30 s window.
- activations: the largest set of tensors alive inside one transformer block (flash attention: no
  T x T score matrix) for Whisper's 30 s window (or its fp32 log-mel front end, if larger), one vision
  batch of image tiles and one LM prefill chunk, plus last-token fp32 logits. On CPU the torch reference
  dequantizes one weight at a time in fp32 (`PackedWeight.dequantize`: codes -> q, q*s, w), so the
  largest packed matrix x 12 bytes is added (not when the process runs no torch: `PlanRequest.torch`).
- workspace: TensorRT tactic workspace (profile) for the engines; the onnxruntime session for VAD.
- overhead: CUDA context, libraries and the interpreter (profile, measured for CPU); without torch
  (`PlanRequest.torch` False: every backend onnxruntime, as the default CPU `run` text path) less the
  profile's `torch_runtime_mib`.
All stages are assumed resident at once (the live runtime keeps them loaded and runs them in parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Union

from edge_mmm.audio.constants import HOP_LENGTH, N_FFT, N_SAMPLES
from edge_mmm.errors import DeviceError, InputError

from .profile import MIB, DeviceProfile
from .specs import SILERO_VAD, WHISPER, LlamaSpec, VLMSpec, WhisperSpec, resolve_spec

LM_QUANTS = ("fp32", "fp16", "int8", "int4")
ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
CPU_DEQUANT_BYTES_PER_WEIGHT = 12  # fp32 q, q*s and w alive together in PackedWeight.dequantize
ASR_SMALLER = {"small": "base", "base": "tiny", "small.en": "base.en", "base.en": "tiny.en"}
VLM_SMALLER = {"smolvlm-500m": "smolvlm-256m"}
MIN_TEXT_TOKENS = 256  # context left for chat text after the image tokens


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the model set, LM quantization and context. None = the device's default."""

    asr: Union[str, WhisperSpec, None] = "tiny.en"
    vlm: Union[str, VLMSpec, None] = "smolvlm-256m"
    llm: Union[str, LlamaSpec, None] = None  # a text-only LM instead of (or with no) VLM
    vad: bool = True
    quant: str = "int4"  # LM weights
    group_size: int = 32
    zeros: bool = True  # INT4 scale + offset (GGUF Q4_1 style); False = scale only (Q4_0 style)
    scale_dtype: str = "fp16"  # GGUF files and GPUs: fp16; quant.quantize_model on CPU: fp32
    context: Optional[int] = None
    encoder_precision: Optional[str] = None  # Whisper + vision tower; default = activation dtype
    asr_beams: int = 1
    vision_batch: Optional[int] = None
    prefill_chunk: Optional[int] = None
    torch: bool = True  # the process imports torch (a torch backend, or a VLM: its LM runs in torch)


@dataclass(frozen=True)
class PlanItem:
    """One row of the plan table."""

    component: str  # asr | vision | lm | vad | runtime
    part: str  # weights | kv_cache | activations | workspace | overhead
    bytes: int
    detail: str

    @property
    def mib(self) -> float:
        return self.bytes / MIB


@dataclass
class DevicePlan:
    """The per-item memory table for one request on one device."""

    device: str
    device_name: str
    budget_bytes: int
    request: dict
    items: List[PlanItem] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    def by_part(self) -> dict:
        out: dict = {}
        for i in self.items:
            out[i.part] = out.get(i.part, 0) + i.bytes
        return out

    def by_component(self) -> dict:
        out: dict = {}
        for i in self.items:
            out[i.component] = out.get(i.component, 0) + i.bytes
        return out

    def to_dict(self) -> dict:
        return {"device": self.device, "device_name": self.device_name, "request": self.request,
                "items": [{"component": i.component, "part": i.part, "bytes": i.bytes,
                           "mib": round(i.mib, 2), "detail": i.detail} for i in self.items],
                "total_bytes": self.total_bytes, "total_mib": round(self.total_bytes / MIB, 2),
                "budget_bytes": self.budget_bytes, "budget_mib": round(self.budget_bytes / MIB, 2),
                "headroom_mib": round(self.headroom_bytes / MIB, 2), "fits": self.fits}

    def summary(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"{self.device}: {self.total_bytes / MIB:,.0f} MiB of {self.budget_bytes / MIB:,.0f} MiB "
                f"usable -> {verdict} (headroom {self.headroom_bytes / MIB:,.0f} MiB)")

    def table(self) -> str:
        """A plain-text table, one row per item, then the total and the verdict."""
        rows = [("component", "part", "MiB", "detail")]
        rows += [(i.component, i.part, f"{i.mib:,.1f}", i.detail) for i in self.items]
        rows.append(("total", "", f"{self.total_bytes / MIB:,.1f}", ""))
        w = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}".rstrip() for r in rows]
        lines.insert(1, "-" * max(len(x) for x in lines))
        return "\n".join(lines + [self.summary()])


# ---------------------------------------------------------------------------------------------
def _weight_bytes(n: int, quant: str, group: int, zeros: bool, scale_bytes: int) -> int:
    if quant in ("fp32", "fp16", "bf16"):
        return n * DTYPE_BYTES[quant]
    groups = -(-n // group)
    if quant == "int8":
        return n + groups * scale_bytes
    if quant == "int4":
        return -(-n // 2) + groups * scale_bytes * (2 if zeros else 1)
    raise InputError(f"unknown quantization '{quant}'; use one of {', '.join(LM_QUANTS)}")


def _encoder_weight_bytes(n: int, precision: str) -> int:
    return n * DTYPE_BYTES[precision]


def _block_activation_elems(tokens: int, hidden: int, q_width: int, kv_width: int, inter: int, gated: bool) -> int:
    """Largest set of tensors alive in one pre-norm transformer block (flash attention)."""
    attn = tokens * (2 * hidden + 2 * q_width + 2 * kv_width)  # x, ln(x), q, k, v, attn out
    mlp = tokens * (2 * hidden + (3 if gated else 2) * inter)  # x, ln(x), up/gate, act
    return max(attn, mlp)


def _log_mel_elems(n_mels: int) -> int:
    """fp32 elements alive in `audio.mel.log_mel_spectrogram` for one 30 s window + its 30 s of padding:
    the waveform and its padded copy, the STFT frames, the complex STFT, |.| and |.|^2, the mel output."""
    samples = 2 * N_SAMPLES
    frames = samples // HOP_LENGTH + 1
    bins = N_FFT // 2 + 1
    return 2 * samples + frames * N_FFT + frames * bins * 2 + 2 * frames * bins + n_mels * frames


def _check_precision(profile: DeviceProfile, precision: str, what: str) -> None:
    if precision in ("int8", "int4") and what == "LM weights":
        return  # weight-only: dequantized into the activation dtype, runs everywhere
    if not profile.supports(precision):
        raise DeviceError(f"{profile.id} does not support {precision} for {what}; "
                          f"supported: {', '.join(profile.precisions)}")


def plan(request: PlanRequest, profile: DeviceProfile) -> DevicePlan:
    """Compute the memory table for `request` on `profile` (does not check that it fits)."""
    asr = resolve_spec(request.asr, "asr")
    vlm = resolve_spec(request.vlm, "vlm")
    llm = resolve_spec(request.llm, "llm")
    if vlm is not None and llm is not None:
        raise InputError("give either a VLM or a text-only LM, not both")
    if asr is None and vlm is None and llm is None:
        raise InputError("empty model set: choose at least one of --asr, --vlm, --llm")
    if request.quant not in LM_QUANTS:
        raise InputError(f"unknown quantization '{request.quant}'; use one of {', '.join(LM_QUANTS)}")
    if request.group_size not in (32, 64, 128):
        raise InputError(f"group size must be 32, 64 or 128, got {request.group_size}")
    act = profile.activation_dtype
    ab = DTYPE_BYTES[act]
    enc = request.encoder_precision or act
    if enc not in ENCODER_PRECISIONS:
        raise InputError(f"unknown encoder precision '{enc}'; use one of {', '.join(ENCODER_PRECISIONS)}")
    _check_precision(profile, enc, "the encoders")
    _check_precision(profile, request.quant, "LM weights")
    if request.scale_dtype not in ("fp16", "fp32"):
        raise InputError(f"scale dtype must be fp16 or fp32, got {request.scale_dtype}")
    scale_bytes = DTYPE_BYTES[request.scale_dtype]
    context = request.context or profile.default_context
    chunk = min(context, request.prefill_chunk or profile.prefill_chunk)
    lm: Optional[LlamaSpec] = vlm.text if vlm is not None else llm
    if lm is not None and context > lm.max_context:
        raise InputError(f"context {context} exceeds {lm.name}'s maximum of {lm.max_context}")
    if context < 1:
        raise InputError(f"context must be positive, got {context}")
    gpu = profile.kind != "cpu"
    items: List[PlanItem] = []
    add = lambda c, p, b, d: items.append(PlanItem(c, p, int(b), d))  # noqa: E731

    if asr is not None:
        if request.asr_beams < 1:
            raise InputError(f"asr beams must be >= 1, got {request.asr_beams}")
        n = asr.param_count()
        if not gpu and not request.torch and enc == "fp32":
            # no torch on a CPU: the decoder's tied projection runs in edge-mmm's C kernel over the checkpoint's
            # fp16 token table (asr/ort_graphs.py); the onnxruntime graphs hold the rest in fp32
            table = asr.n_vocab * asr.n_text_state
            add("asr", "weights", _encoder_weight_bytes(n - table, enc) + table * 2,
                f"whisper {asr.name}: {n / 1e6:.1f}M params x fp32, its token table ({table / 1e6:.1f}M) fp16")
        else:
            add("asr", "weights", _encoder_weight_bytes(n, enc), f"whisper {asr.name}: {n / 1e6:.1f}M params x {enc}")
        d, L = asr.n_text_state, asr.n_text_layer
        self_kv = request.asr_beams * 2 * L * asr.n_text_ctx * d * ab
        cross_kv = 2 * L * asr.n_audio_ctx * d * ab
        add("asr", "kv_cache", self_kv + cross_kv,
            f"self {request.asr_beams} beam(s) x {asr.n_text_ctx} pos + cross {asr.n_audio_ctx} frames, {act}")
        da, T = asr.n_audio_state, asr.n_audio_ctx
        enc_elems = max(2 * T * 2 * da, _block_activation_elems(T, da, da, da, 4 * da, False)) + asr.n_mels * 2 * T
        dec_elems = request.asr_beams * (asr.n_vocab + 10 * d)
        # the log-mel front end (fp32) runs before the encoder and is freed: the peak is the larger
        add("asr", "activations", max(enc_elems * ab, _log_mel_elems(asr.n_mels) * 4) + dec_elems * 4,
            f"max(log-mel front end, encoder block) over one 30 s window ({T} frames) + decoder logits")

    if vlm is not None:
        v = vlm.vision
        n = v.param_count() + vlm.connector_params()
        # planned at the encoder precision (fp32 on a CPU profile) even when the onnxruntime encoder runs int8
        # (vision_precision auto or int8): which one runs is known only after its first-use check, and the
        # plan must not under-estimate
        add("vision", "weights", _encoder_weight_bytes(n, enc),
            f"{v.name} + connector: {n / 1e6:.1f}M params x {enc}")
        batch = min(request.vision_batch or profile.vision_batch, vlm.max_tiles)
        if batch < 1:
            raise InputError(f"vision batch must be >= 1, got {batch}")
        toks = batch * v.tokens
        elems = (batch * v.channels * v.image_size ** 2 + _block_activation_elems(toks, v.hidden, v.hidden, v.hidden,
                                                                                  v.intermediate, False)
                 + batch * vlm.tokens_per_tile * vlm.text.hidden)
        add("vision", "activations", elems * ab, f"{batch} tile(s) x {v.tokens} patches per encoder call")
        image_tokens = vlm.max_tiles * vlm.tokens_per_tile
        if context < image_tokens + MIN_TEXT_TOKENS:
            raise InputError(f"context {context} is too small for one image ({image_tokens} image tokens "
                             f"+ {MIN_TEXT_TOKENS} text); use at least {image_tokens + MIN_TEXT_TOKENS}")

    if lm is not None:
        q = request.quant
        quantized = q in ("int8", "int4")
        table_params = lm.embedding_params() + lm.lm_head_params()
        if getattr(lm, "int8_table", False) and not request.torch and q == "int4":
            # no torch: the CPU LM kernel holds the file's 4-bit blocks with fp32 scales and offsets and its
            # INT8 table (codes + an fp32 scale per 32): docs/lm.md
            w = _weight_bytes(lm.linear_params(), q, request.group_size, request.zeros, 4)
            emb_q, w_emb = "int8 (the file's Q8_0)", _weight_bytes(table_params, "int8", 32, False, 4)
        else:
            w = _weight_bytes(lm.linear_params(), q, request.group_size, request.zeros, scale_bytes)
            # embedding (and an untied head) stay dense: the GGUF loader dequantizes the Q8_0 table once for
            # the lookup, and quantize_model skips the LM head
            emb_q = act if quantized else q
            w_emb = _weight_bytes(table_params, emb_q, request.group_size, False, scale_bytes)
        w_rest = (lm.norm_params() + lm.bias_params()) * ab
        qdesc = f"{q} g{request.group_size}{'+zero' if request.zeros and q == 'int4' else ''}" if quantized else q
        add("lm", "weights", w + w_emb + w_rest,
            f"{lm.name}: {lm.param_count() / 1e6:.1f}M params; linears {qdesc}, embedding+head {emb_q}")
        add("lm", "kv_cache", context * lm.kv_bytes_per_token(ab),
            f"{context} tokens x {lm.kv_bytes_per_token(ab) / 1024:.1f} KiB/token ({act})")
        elems = _block_activation_elems(chunk, lm.hidden, lm.heads * lm.head_dim, lm.kv_heads * lm.head_dim,
                                        lm.intermediate, True)
        add("lm", "activations", elems * ab + lm.vocab * 4, f"prefill chunk of {chunk} tokens + last-token logits")
        if quantized and not gpu and request.torch:
            largest = max(lm.hidden * lm.intermediate, lm.hidden * lm.heads * lm.head_dim)
            add("lm", "workspace", largest * CPU_DEQUANT_BYTES_PER_WEIGHT,
                f"torch CPU reference dequantizes one weight at a time ({largest / 1e6:.1f}M x 12 B)")

    if gpu and profile.trt_workspace_mib and (asr is not None or vlm is not None):
        add("encoders", "workspace", profile.trt_workspace_mib * MIB, "TensorRT workspace pool (profile)")

    if request.vad:
        if profile.unified_memory:
            add("vad", "weights", SILERO_VAD.param_count() * 4, "silero VAD, fp32 on CPU")
            add("vad", "workspace", SILERO_VAD.session_mib * MIB - SILERO_VAD.param_count() * 4,
                "onnxruntime session (measured 17 MiB incl. weights)")
        else:
            add("vad", "weights", 0, "silero VAD runs on the host CPU (not in the GPU budget)")

    if request.torch or not profile.torch_runtime_mib:
        add("runtime", "overhead", profile.runtime_overhead_mib * MIB,
            "CUDA context + libraries + interpreter (profile)" if gpu else "Python + torch + onnxruntime (measured)")
    else:
        add("runtime", "overhead", (profile.runtime_overhead_mib - profile.torch_runtime_mib) * MIB,
            "libraries + interpreter, no torch (profile, measured)" if gpu else "Python + onnxruntime, no torch (measured)")

    req = {"asr": asr.name if asr else None, "vlm": vlm.name if vlm else None, "llm": llm.name if llm else None,
           "vad": request.vad, "quant": request.quant, "group_size": request.group_size, "zeros": request.zeros,
           "context": context, "prefill_chunk": chunk, "encoder_precision": enc, "activation_dtype": act,
           "asr_beams": request.asr_beams, "torch": request.torch,
           "vision_batch": min(request.vision_batch or profile.vision_batch, vlm.max_tiles) if vlm else None}
    return DevicePlan(profile.id, profile.name, profile.usable_bytes, req, items)


# ---------------------------------------------------------------------------------------------
def _candidates(request: PlanRequest, current: DevicePlan):
    """Single changes to try, cheapest (least quality lost) first: (description, new request)."""
    ctx = current.request["context"]
    c = ctx // 2
    while c >= 512:
        yield f"--context {c}", replace(request, context=c)
        c //= 2
    if request.quant != "int4":
        yield "--quant int4", replace(request, quant="int4")
    asr = current.request["asr"]
    while asr in ASR_SMALLER:
        asr = ASR_SMALLER[asr]
        yield f"--asr {asr}", replace(request, asr=WHISPER[asr])
    if current.request["vision_batch"] and current.request["vision_batch"] > 1:
        yield "--vision-batch 1", replace(request, vision_batch=1)
    vlm = current.request["vlm"]
    if vlm in VLM_SMALLER:
        yield f"--vlm {VLM_SMALLER[vlm]}", replace(request, vlm=VLM_SMALLER[vlm])


def cheapest_fix(request: PlanRequest, profile: DeviceProfile, current: Optional[DevicePlan] = None):
    """The first single change (in `_candidates` order) whose plan fits, as (flag, plan), or None."""
    current = current or plan(request, profile)
    for desc, req in _candidates(request, current):
        try:
            p = plan(req, profile)
        except InputError:
            continue  # e.g. a context too small for the image tokens
        if p.fits:
            return desc, p
    return None


def _all_fixes(request: PlanRequest, profile: DeviceProfile):
    """Apply the changes cumulatively (each kind at its most aggressive) until the plan fits or none is left."""
    flags: List[str] = []
    req, cur = request, plan(request, profile)
    while not cur.fits:
        options = []
        for desc, cand in _candidates(req, cur):
            try:
                options.append((desc, cand, plan(cand, profile)))
            except InputError:
                continue  # e.g. a context too small for the image tokens
        if not options:
            break
        kind = options[0][0].split()[0]
        desc, req, cur = [o for o in options if o[0].split()[0] == kind][-1]
        flags = [f for f in flags if f.split()[0] != kind] + [desc]
    if cur.fits and req.context != request.context:  # give back as much context as still fits
        c = (request.context or profile.default_context) // 2
        while c > req.context:
            bigger = plan(replace(req, context=c), profile)
            if bigger.fits:
                flags = [f"--context {c}" if f.startswith("--context") else f for f in flags]
                return flags, bigger
            c //= 2
    return flags, cur


def check_fits(request: PlanRequest, profile: DeviceProfile) -> DevicePlan:
    """Plan and return it if it fits; otherwise raise DeviceError with the numbers and the cheapest fix."""
    p = plan(request, profile)
    if p.fits:
        return p
    need, have = p.total_bytes / MIB, p.budget_bytes / MIB
    parts = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in p.by_part().items())
    msg = (f"plan does not fit on {profile.id}: needs {need:,.0f} MiB, {have:,.0f} MiB usable "
           f"(over by {need - have:,.0f} MiB; {parts} MiB)")
    fix = cheapest_fix(request, profile, p)
    if fix is not None:
        desc, fp = fix
        msg += f"; cheapest change that fits: {desc} ({fp.total_bytes / MIB:,.0f} MiB)"
    else:
        flags, fp = _all_fixes(request, profile)
        if fp.fits:
            msg += f"; no single change fits, together these do: {' '.join(flags)} ({fp.total_bytes / MIB:,.0f} MiB)"
        else:
            msg += (f"; nothing fits: even with {' '.join(flags) or 'the smallest settings'} it needs "
                    f"{fp.total_bytes / MIB:,.0f} MiB - choose a smaller model or a larger device")
    err = DeviceError(msg)
    err.plan = p  # type: ignore[attr-defined]
    raise err
