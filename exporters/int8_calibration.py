"""Static INT8 post-training quantization of the encoders (ONNX Q/DQ) and the matching TensorRT calibration cache.

One set of activation ranges, two consumers:
- `quantize_encoder_static` runs onnxruntime's `quantize_static` over real calibration inputs and writes a
  QDQ model: int8 weights per output channel behind `DequantizeLinear`, int8 activations behind
  `QuantizeLinear -> DequantizeLinear` pairs. Everything is symmetric (zero points 0), because TensorRT's
  ONNX parser only accepts zero zero-points (onnx-tensorrt operators.md: "`y_zero_point` must be 0"), and
  it is static: no `DynamicQuantizeLinear` / `MatMulInteger`, which TensorRT cannot parse. The QDQ model
  runs on onnxruntime (CPU) and is TensorRT's explicit-quantization input.
- `write_tensorrt_calibration_cache` writes the same activation scales (read back from the QDQ model's
  `QuantizeLinear` nodes) as a TensorRT calibration cache, for an implicit-quantization engine built from
  the fp32 ONNX (the tensor names are the fp32 graph's: quantize_static keeps them).

Calibration method: MinMax by default. Measured on Whisper tiny.en's encoder (8 espeak calibration clips,
4 held-out clips, fc2 float): min cosine of the cross K/V outputs 0.99712 (MinMax), 0.99718 (Percentile
99.999), 0.99712 (Entropy); mean 0.9984 / 0.9985 / 0.9984. Quality is equal, MinMax takes 17 s here and the
histogram methods 50 s, MinMax is deterministic and never clips an activation: it is the default. Entropy and
Percentile stay selectable (`CalibrationConfig.method`). Which linears stay float is measured, not guessed:
see WHISPER_ENCODER_EXCLUDE.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_mmm.errors import InputError, ModelFileError

METHODS = ("minmax", "entropy", "percentile")
# Ops with a constant weight input get int8 weights and an int8 input (see quantizable_nodes); activation x
# activation MatMuls (attention scores, attention x V) stay float.
DEFAULT_OP_TYPES = ("MatMul", "Gemm")  # Whisper's two input Convs cost 0.007 output cosine in int8: left float
# Op types a TensorRT-bound quantized graph must not contain (dynamic or integer-arithmetic quantization).
NOT_TENSORRT_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")
CACHE_ALGORITHM = "EntropyCalibration2"  # the header TensorRT's IInt8EntropyCalibrator2 writes and reads
INT8_MAX = 127.0


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate: `method` minmax | entropy | percentile (`percentile` used by the last one),
    per-channel weights (axis = output channel), which op types get int8."""

    method: str = "minmax"
    per_channel: bool = True
    op_types: Tuple[str, ...] = DEFAULT_OP_TYPES
    percentile: float = 99.999
    exclude: Tuple[str, ...] = ()  # regexes on node names: these stay float (mixed precision)

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 90.0 <= self.percentile <= 100.0:
            raise InputError(f"calibration percentile must be in [90, 100], got {self.percentile}")
        if not self.op_types:
            raise InputError("calibration op_types must not be empty")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"calibration exclude pattern {pattern!r} is not a regex: {exc}") from exc


# Whisper's encoder fc2 (MLP down projection) stays float: its input is post-GELU with outliers ~50x its 99.9th
# percentile (560 vs 10 in tiny.en's last block), and quantizing the four fc2 alone drops the min cosine of the
# encoder outputs (cross K/V) to 0.982, while every other group of linears alone keeps it >= 0.9988
# (`python benchmarks/encoder_int8.py --sensitivity`, docs/deploy-jetson.md).
WHISPER_ENCODER_EXCLUDE = (r"/mlp/mlp\.2/",)


@dataclass
class Int8Export:
    """A written QDQ model and the activation scales (amax / 127) it uses, by fp32 tensor name."""

    path: Path
    method: str
    n_calibration: int
    activation_scales: Dict[str, float] = field(default_factory=dict)


def _reader(feeds: Sequence[Mapping[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class _ArrayReader(CalibrationDataReader):
        """Feeds a fixed list of input dicts, one per calibration batch."""

        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    return _ArrayReader()


def _check_feeds(onnx_path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
    import onnx

    if not feeds:
        raise InputError("static INT8 quantization needs at least one calibration input")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    out = []
    for k, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        if missing:
            raise InputError(f"calibration input {k} lacks graph input(s) {', '.join(missing)} of {onnx_path}")
        out.append({n: np.ascontiguousarray(feed[n]) for n in names})
    return out


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_encoder_static(onnx_path: Union[str, Path], calibration_inputs: Sequence[Mapping[str, np.ndarray]],
                            out_path: Union[str, Path], config: Optional[CalibrationConfig] = None) -> Int8Export:
    """Write a static INT8 QDQ copy of the fp32 `onnx_path` to `out_path` (atomically).

    `calibration_inputs`: one dict per calibration batch, graph input name -> array (real data: log-mel of
    speech for Whisper, processed photo tiles for vision). Returns the activation scales the model uses.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cfg = config or CalibrationConfig()
    src, dst = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise ModelFileError(f"{src}: ONNX model to quantize not found")
    feeds = _check_feeds(src, calibration_inputs)
    nodes = quantizable_nodes(src, cfg.op_types, cfg.exclude)
    if not nodes:
        raise InputError(f"{src}: no {'/'.join(cfg.op_types)} node with a constant weight left to quantize")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.method]
    # biases stay float: an int32 bias DequantizeLinear is not something TensorRT's parser takes (DequantizeLinear:
    # INT8/FP8/INT4 inputs only); TensorRT fuses the float bias into the int8 layer itself
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             # per-channel axis of a MatMul weight [K, N] is its output channel N
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             # outputs stay float (their consumers are float); keeps graph outputs' names and values unquantized
             "OpTypesToExcludeOutputQuantization": list(cfg.op_types)}
    if cfg.method == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".onnx", dir=dst.parent)
    os.close(fd)
    try:
        with _quiet_root_logger():
            quantize_static(str(src), tmp, _reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(cfg.op_types), nodes_to_quantize=nodes,
                            per_channel=cfg.per_channel,
                            reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, calibration_providers=["CPUExecutionProvider"],
                            extra_options=extra)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    problems = qdq_problems(dst)
    if problems:
        raise ModelFileError(f"{dst}: quantized model is not TensorRT-ready: {'; '.join(problems)}")
    return Int8Export(dst, cfg.method, len(feeds), activation_scales(dst))


def quantizable_nodes(onnx_path: Union[str, Path], op_types: Sequence[str] = DEFAULT_OP_TYPES,
                      exclude: Sequence[str] = ()) -> List[str]:
    """Names of the `op_types` nodes whose weight (input 1) is a constant, minus names matching `exclude`.
    Activation x activation MatMuls (attention scores, attention x V) are left float."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name for i in model.graph.initializer} | {n.output[0] for n in model.graph.node
                                                          if n.op_type == "Constant"}
    out = []
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2 or node.input[1] not in consts:
            continue
        if not node.name:
            raise ModelFileError(f"{onnx_path}: a {node.op_type} node has no name; cannot select it for quantization")
        if any(re.search(p, node.name) for p in exclude):
            continue
        out.append(node.name)
    return out


def _const_value(model, name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def activation_scales(qdq_path: Union[str, Path]) -> Dict[str, float]:
    """{fp32 tensor name: scale} of every activation `QuantizeLinear` (per-tensor) in a QDQ model."""
    import onnx

    model = onnx.load(str(qdq_path), load_external_data=False)
    scales: Dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        scale = _const_value(model, node.input[1])
        if scale is None or scale.size != 1:
            continue
        scales[node.input[0]] = float(scale.reshape(()))
    return scales


def qdq_problems(path: Union[str, Path]) -> List[str]:
    """Why a quantized graph would not suit TensorRT: dynamic/integer quantization ops, non-zero or
    non-int8 zero points. Empty when it is a plain symmetric int8 Q/DQ graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    problems = []
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in NOT_TENSORRT_OPS})
    if bad:
        problems.append(f"uses {', '.join(bad)}")
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zp = _const_value(model, node.input[2])
        if zp is None:
            problems.append(f"{node.name or node.op_type}: zero point {node.input[2]} is not a constant")
        elif zp.dtype != np.int8:
            problems.append(f"{node.name or node.op_type}: zero point type {zp.dtype} (TensorRT needs int8)")
        elif np.any(zp != 0):
            problems.append(f"{node.name or node.op_type}: non-zero zero point")
    return problems


# ----------------------------------------------------------------------------------------------------------
# TensorRT calibration cache (text)
# ----------------------------------------------------------------------------------------------------------
# Format, as TensorRT's IInt8Calibrator writeCalibrationCache emits it and NVIDIA's TAO exporter writes it
# (NVIDIA/tao_tensorflow1_backend nvidia_tao_tf1/cv/common/export/keras_exporter.py,
# `_calibration_cache_from_dict`): a header line `TRT-<version code>-<algorithm>` (e.g. TRT-8601-
# EntropyCalibration2 for 8.6.1, TRT-100300-... for 10.3.0), then one `tensor_name: <hex>` line per tensor,
# where <hex> is the IEEE-754 bit pattern of the float32 scale (= amax / 127) written as a big-endian hex
# integer without leading zeros or 0x.
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


def tensorrt_version_code(version: str) -> int:
    """TensorRT's numeric version in cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300 (major >= 10: 2 digits
    each for minor and patch)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    if not parts:
        raise InputError(f"bad TensorRT version {version!r} (expected e.g. 10.3 or 10.3.0)")
    major, minor, patch = (parts + [0, 0])[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def _scale_hex(scale: float) -> str:
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "x")


def _hex_scale(text: str) -> float:
    return struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0]


def format_calibration_cache(scales: Mapping[str, float], trt_version: str = "10.3",
                             algorithm: str = CACHE_ALGORITHM) -> str:
    """The cache text for `scales` (tensor name -> scale = amax / 127)."""
    lines = [f"TRT-{tensorrt_version_code(trt_version)}-{algorithm}"]
    for name, scale in scales.items():
        if not np.isfinite(scale) or scale < 0:
            raise InputError(f"calibration scale of {name!r} must be finite and >= 0, got {scale}")
        if ": " in name or "\n" in name:
            raise InputError(f"tensor name {name!r} cannot be written to a calibration cache")
        lines.append(f"{name}: {_scale_hex(float(scale))}")
    return "\n".join(lines) + "\n"


def write_tensorrt_calibration_cache(scales: Mapping[str, float], path: Union[str, Path],
                                     trt_version: str = "10.3", algorithm: str = CACHE_ALGORITHM) -> Path:
    """Write the cache file atomically; returns its path."""
    from edge_mmm.exporters.tensorrt_build import atomic_write_bytes

    return atomic_write_bytes(Path(path), format_calibration_cache(scales, trt_version, algorithm).encode())


@dataclass
class CalibrationCache:
    version_code: int
    algorithm: str
    scales: Dict[str, float]


def parse_calibration_cache(text: Union[str, bytes], source: str = "<cache>") -> CalibrationCache:
    """Parse cache text; a malformed header or line is a ModelFileError naming `source` and the line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not _HEADER.match(lines[0].strip()):
        raise ModelFileError(f"{source}: not a TensorRT calibration cache (header {lines[:1]!r})")
    m = _HEADER.match(lines[0].strip())
    scales: Dict[str, float] = {}
    for no, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{1,8}", value.strip()):
            raise ModelFileError(f"{source}: line {no} is not 'tensor: hexscale': {line!r}")
        scales[name] = _hex_scale(value.strip())
    return CalibrationCache(int(m.group(1)), m.group(2), scales)


def read_tensorrt_calibration_cache(path: Union[str, Path]) -> CalibrationCache:
    path = Path(path)
    try:
        return parse_calibration_cache(path.read_bytes(), str(path))
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read calibration cache ({exc.strerror or exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# Calibration inputs from real data
# ----------------------------------------------------------------------------------------------------------
def whisper_calibration_inputs(clips: Iterable[np.ndarray], n_mels: int) -> List[Dict[str, np.ndarray]]:
    """{"mel": [1, n_mels, 3000]} per 16 kHz clip: the log-mel the encoder sees (padded to 30 s)."""
    from edge_mmm.audio.constants import N_FRAMES, N_SAMPLES
    from edge_mmm.audio.mel import log_mel_spectrogram, pad_or_trim

    return [{"mel": pad_or_trim(log_mel_spectrogram(np.asarray(a, np.float32), n_mels, padding=N_SAMPLES),
                                N_FRAMES).numpy()[None].astype(np.float32)} for a in clips]


def vision_calibration_inputs(images: Iterable, processor, patch_size: int) -> List[Dict[str, np.ndarray]]:
    """{"pixel_values": [n_tiles, 3, S, S], "patch_mask": [n_tiles, S/p, S/p]} per image, through our
    Idefics3 image processor (the same tiles and normalization inference uses)."""
    import torch

    from edge_mmm.models.idefics3 import real_tiles

    out = []
    for image in images:
        proc = processor([image])
        pv, mask = real_tiles(torch.from_numpy(proc.pixel_values), torch.from_numpy(proc.pixel_attention_mask),
                              patch_size)
        out.append({"pixel_values": pv.numpy().astype(np.float32), "patch_mask": mask.numpy()})
    return out


def synthesize_speech_clips(texts: Sequence[str], workdir: Union[str, Path]) -> List[np.ndarray]:
    """16 kHz float32 clips of `texts` spoken by espeak-ng (voices rotate), for calibration/evaluation sets."""
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import synthesize

    voices = [("en-us", 150, 50), ("en-gb", 140, 40), ("en-us", 170, 60), ("en-gb-x-rp", 150, 55)]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(texts):
        voice, speed, pitch = voices[i % len(voices)]
        clips.append(load_audio(synthesize(text, workdir / f"calib{i:03d}.wav", voice=voice, speed=speed,
                                           pitch=pitch)))
    return clips
