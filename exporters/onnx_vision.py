"""ONNX export of the Idefics3 vision part (SigLIP tower + pixel-shuffle connector), checked against eager.

Graph: `pixel_values` (N, 3, S, S) float, `patch_mask` (N, S/p, S/p) bool -> `image_features`
(N, image_seq_len, text_dim), N dynamic. FP32 is exported directly; FP16 is the FP32 graph converted with
onnxruntime's float16 converter (inputs/outputs stay float32/bool so callers need not care), then
topologically re-sorted (the converter appends its boundary Casts at the end of the node list, which
onnx.checker rejects); INT8 is static post-training quantization with Q/DQ nodes (symmetric int8, per-channel
weights) calibrated on real tiles (exporters/int8_calibration.py): the same model runs on onnxruntime and is
TensorRT's explicit-quantization input (no DynamicQuantizeLinear, which TensorRT cannot parse). INT8-DYNAMIC
is the CPU onnxruntime variant (`quantize_int8_dynamic`): the FP32 graph with every weight MatMul turned into
int8 weights (per output channel, 7-bit `reduce_range`) and activations quantized per call; the attention
matmuls (activation x activation: Q K^T and A V) and the connector projection stay FP32. No calibration, and not a TensorRT input. Every
export is run once with onnxruntime on the check tiles (`check_tiles`: photo-like `natural_tiles` through the
checkpoint's normalization, then random-normal ones) and compared with the eager module (max abs error, mean
and lowest per-tile cosine returned; FP32 must be < 1e-4, INT8-DYNAMIC must reach mean cosine >= 0.999).
`export_vision_auto` writes the graph `load_vlm(vision_precision="auto")` runs: INT8-DYNAMIC when every
photo-like tile keeps cosine >= 0.999, else FP32.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

import torch

from edge_mmm.errors import EdgeMMMError, InputError
from edge_mmm.exporters import TORCH_EXPORT_LOCK
from edge_mmm.models.idefics3 import Idefics3Vision

FP32_ATOL = 1e-4  # stated tolerance of the FP32 export vs eager
# stated tolerance of the int8-dynamic export vs eager fp32: its mean cosine (an explicit int8 export is refused
# below it); `export_vision_auto` asks it of every photo-like check tile
INT8_DYNAMIC_MIN_COSINE = 0.999
NATURAL_CHECK_TILES = 5  # photo-like tiles of every export check (`check_tiles`)
RANDOM_CHECK_TILES = 3  # random-normal tiles after them (not in auto's check: no camera sees them)
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
INPUT_NAMES = ("pixel_values", "patch_mask")
OUTPUT_NAME = "image_features"


@dataclass
class VisionExport:
    path: Path
    precision: str  # fp32 | fp16 | int8 | int8-dynamic
    max_abs_err: float
    cosine: float  # mean cosine similarity of features vs eager, over the check tiles
    min_cosine: float = float("nan")  # the lowest check tile's
    tiles: int = 0  # check tiles compared


def vision_file(precision: str) -> str:
    """The file name of a precision's export: vision_fp32.onnx, ..., vision_int8_dynamic.onnx."""
    return f"vision_{precision.replace('-', '_')}.onnx"


def _dummy_inputs(vision: Idefics3Vision, n: int, seed: int = 0):
    s = vision.vision_model.config.image_size
    p = vision.patch_size
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(n, 3, s, s, generator=g)
    mask = torch.ones(n, s // p, s // p, dtype=torch.bool)
    return pv, mask


def natural_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """`n` deterministic RGB tiles, uint8 (n, size, size, 3), with statistics that photos have and random-normal
    pixels lack: a smooth two-colour gradient (sky, walls), flat-coloured discs and rectangles with sharp edges
    over it (objects in front of each other), and 1/f ("pink") noise texture whose channels share most of their
    content (a photo's colours are correlated). Uint8 so that the checkpoint's own normalization applies."""
    rng = np.random.default_rng(seed)
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    freq[0, 0] = np.inf  # no constant term: the gradient sets the level
    yy, xx = np.mgrid[0:size, 0:size] / size

    def pink() -> np.ndarray:
        spectrum = (rng.standard_normal(freq.shape) + 1j * rng.standard_normal(freq.shape)) / freq
        x = np.fft.irfft2(spectrum, s=(size, size))
        return x / x.std()

    tiles = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = ((ramp - ramp.min()) / np.ptp(ramp))[..., None]
        low, high = rng.uniform(0, 255, (2, 3))
        img = low + (high - low) * ramp
        for _ in range(rng.integers(3, 8)):
            cy, cx = rng.uniform(0, 1, 2)
            if rng.random() < 0.5:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(0.05, 0.3) ** 2
            else:
                h, w = rng.uniform(0.05, 0.4, 2)
                inside = (np.abs(yy - cy) < h) & (np.abs(xx - cx) < w)
            img[inside] = rng.uniform(0, 255, 3)
        texture = 0.9 * pink()[..., None] + 0.3 * np.stack([pink() for _ in range(3)], axis=-1)
        tiles[i] = np.clip(np.rint(img + rng.uniform(8, 30) * texture), 0, 255)
    return tiles


def siglip_normalize(tile: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW as SigLIP's image processor does it (rescale 1/255, mean = std = 0.5: pixels in
    [-1, 1], SmolVLM's preprocessor_config.json): the checks' normalization when no processor is given."""
    return (tile.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5


def check_tiles(vision: Idefics3Vision, normalize: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                n_natural: int = NATURAL_CHECK_TILES, n_random: int = RANDOM_CHECK_TILES):
    """(pixel_values, patch_mask) of the export checks, every patch real: `n_natural` `natural_tiles` through
    `normalize` (uint8 HWC -> float32 CHW: the checkpoint's image processor's; default `siglip_normalize`),
    then `n_random` random-normal tiles."""
    normalize = normalize or siglip_normalize
    s, g = vision.vision_model.config.image_size, vision.vision_model.config.image_size // vision.patch_size
    natural = torch.from_numpy(np.stack([normalize(t) for t in natural_tiles(n_natural, s)]).astype(np.float32))
    pv = torch.cat([natural, _dummy_inputs(vision, n_random, seed=1)[0]])
    return pv, torch.ones(pv.shape[0], g, g, dtype=torch.bool)


def _export_fp32(vision: Idefics3Vision, path: Path, opset: int) -> None:
    pv, mask = _dummy_inputs(vision, 2)
    n = torch.export.Dim("n_tiles", min=1, max=256)
    with TORCH_EXPORT_LOCK:
        prog = torch.onnx.export(vision.eval(), (pv, mask), dynamo=True, opset_version=opset,
                                 input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                 dynamic_shapes={"pixel_values": {0: n}, "patch_mask": {0: n}},
                                 optimize=True, verbose=False)
    prog.save(str(path))


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # LayerNorm/Softmax stay fp32 for accuracy; weights and matmuls go to fp16
    model16 = convert_float_to_float16(model, keep_io_types=True,
                                       op_block_list=["LayerNormalization", "Softmax", "ReduceMean", "Pow",
                                                      "Sqrt", "Div"])
    _topological_sort(model16)
    _save_atomic(model16, dst)


def _topological_sort(model) -> None:
    """Order the graph's nodes so every input is produced before it is read (onnx.checker's rule)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).topological_sort(is_deterministic=True)


def _save_atomic(model, dst: Path) -> None:
    from edge_mmm.exporters.tensorrt_build import atomic_write_bytes

    atomic_write_bytes(dst, model.SerializeToString())


def _to_int8(src: Path, dst: Path, calibration: Sequence[Dict[str, np.ndarray]]) -> None:
    from edge_mmm.exporters.int8_calibration import quantize_encoder_static

    quantize_encoder_static(src, calibration, dst)


def activation_matmuls(model) -> list:
    """Names of the MatMul nodes whose second input is not an initializer (the attention's Q K^T and A V):
    dynamic quantization would quantize both activations there, which costs accuracy and buys little."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]


def output_matmuls(model) -> list:
    """Names of the MatMul nodes nearest the graph output (walking back through non-MatMul nodes): here the
    connector's projection, whose 12288-long reductions (pixel-shuffled 768 x 16) add up the most
    activation-quantization noise; it is ~0.3% of the encoder's multiply-adds."""
    producer = {out: n for n in model.graph.node for out in n.output}
    found, seen = [], set()
    todo = [o.name for o in model.graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul":
            found.append(node.name)
        else:
            todo.extend(node.input)
    return found


def quantize_int8_dynamic(src: Path, dst: Path) -> int:
    """Write `dst`: `src` (an FP32 vision graph) with its weight MatMuls quantized by onnxruntime's dynamic
    quantization: int8 weights per output channel with `reduce_range` (7-bit: onnxruntime's AVX2 u8 x s8
    kernel adds pairs of products in int16 (vpmaddubsw) and saturates with full-range weights; measured
    cosine 0.993 without it, 0.9999 with it, on SmolVLM-256M dims), uint8 activations quantized per call.
    The activation x activation MatMuls stay FP32, and so does the connector projection (`output_matmuls`:
    at SmolVLM-256M dims it moves the cosine from 0.99915 to 0.99936 for ~0.3% of the work). Written to a
    temp file beside `dst`, then renamed. Returns how many MatMuls were left FP32."""
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    excluded = activation_matmuls(model) + output_matmuls(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", suffix=".onnx", dir=dst.parent)
    os.close(fd)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded)
        os.replace(tmp, dst)
    finally:
        root.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(excluded)


_HEAD_OPS = ("Mul", "Transpose", "Reshape")  # what torch's exporter puts between a projection and Q K^T / A V
KEY_PADDING_MASK = "attention_key_padding_mask"


def _constant_scalar(model_inits: dict, producers: dict, name: str) -> Optional[float]:
    """The value of a scalar initializer or Constant node output, else None."""
    from onnx import numpy_helper

    if name in model_inits:
        arr = numpy_helper.to_array(model_inits[name])
    elif name in producers and producers[name].op_type == "Constant":
        arr = numpy_helper.to_array(producers[name].attribute[0].t)
    else:
        return None
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _projection(name: str, producers: dict, inits: dict) -> Tuple[str, float]:
    """Walk back from an attention operand through the head split (Reshape / Transpose) and the scale (Mul by a
    constant) to the [batch, tokens, width] projection it came from: (projection name, product of the scales)."""
    scale = 1.0
    while True:
        node = producers.get(name)
        if node is None or node.op_type not in _HEAD_OPS:
            return name, scale
        if node.op_type == "Mul":
            consts = [_constant_scalar(inits, producers, i) for i in node.input]
            if consts[1] is not None:
                scale, name = scale * consts[1], node.input[0]
            elif consts[0] is not None:
                scale, name = scale * consts[0], node.input[1]
            else:
                return name, scale  # an activation product: not a head-split chain
        else:
            name = node.input[0]


def fuse_attention(src: Path, dst: Path, num_heads: int) -> int:
    """Write `dst`: the FP32 vision graph `src` (as torch's exporter writes it) with each self-attention core,
    `softmax(scaled Q K^T + key-padding bias) V` and its head split / merge reshapes, replaced by one
    `com.microsoft::MultiHeadAttention` node on the Q, K, V projections, with the key-padding mask taken from
    `patch_mask` (1 = a real patch). onnxruntime's fused CPU kernel skips the [tiles, heads, tokens, tokens]
    bias add and the separate softmax pass (SmolVLM-256M dims, AVX-512 VNNI host: fp32 654 -> 597 ms per tile,
    the int8 graph 372 -> 300 ms; docs/models.md). onnxruntime only: TensorRT cannot parse the op, so the
    bundle graphs (fp32 / fp16 / static int8) never get it. Returns how many attentions were fused;
    EdgeMMMError when a Softmax is not an attention core of the expected form (an exporter change)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in graph.initializer}

    def only_consumer(name: str, op: str):
        nodes = consumers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type != op:
            raise EdgeMMMError(f"fuse_attention {src}: {name} is not read by exactly one {op}")
        return nodes[0]

    if "patch_mask" not in {i.name for i in graph.input}:
        raise EdgeMMMError(f"fuse_attention {src}: no patch_mask input to make the key-padding mask from")
    fused, mask_tensors = {}, set()
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores = producers.get(softmax.input[0])
        if scores is not None and scores.op_type == "Add":  # + the key-padding bias
            mm = [producers.get(i) for i in scores.input]
            which = 0 if mm[0] is not None and mm[0].op_type == "MatMul" else 1
            mask_tensors.add(scores.input[1 - which])
            scores = mm[which]
        if scores is None or scores.op_type != "MatMul":
            raise EdgeMMMError(f"fuse_attention {src}: Softmax {softmax.name} does not read Q K^T")
        q, q_scale = _projection(scores.input[0], producers, inits)
        k, k_scale = _projection(scores.input[1], producers, inits)
        weighted = only_consumer(softmax.output[0], "MatMul")
        v, v_scale = _projection(weighted.input[1], producers, inits)
        merge = only_consumer(weighted.output[0], "Transpose")
        out = only_consumer(merge.output[0], "Reshape").output[0]
        if v_scale != 1.0 or len({q, k, v}) != 3:
            raise EdgeMMMError(f"fuse_attention {src}: attention at {softmax.name} has an unexpected form")
        fused[out] = helper.make_node("MultiHeadAttention", [q, k, v, "", KEY_PADDING_MASK] if mask_tensors else
                                      [q, k, v], [out], domain="com.microsoft", name=f"{softmax.name}_mha",
                                      num_heads=num_heads, scale=float(q_scale * k_scale))
    if len(mask_tensors) > 1:
        raise EdgeMMMError(f"fuse_attention {src}: the attentions use {len(mask_tensors)} different masks")
    nodes = []
    if mask_tensors:  # [tiles, 32, 32] bool -> [tiles, 1024] int32, 1 where the patch is real
        graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), f"{KEY_PADDING_MASK}_shape"))
        nodes += [helper.make_node("Reshape", ["patch_mask", f"{KEY_PADDING_MASK}_shape"], [f"{KEY_PADDING_MASK}_bool"]),
                  helper.make_node("Cast", [f"{KEY_PADDING_MASK}_bool"], [KEY_PADDING_MASK], to=TensorProto.INT32)]
    nodes += [fused.get(n.output[0], n) if n.output else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    from onnxruntime.transformers.onnx_model import OnnxModel

    # drop what only the replaced subgraphs read (nodes, then initializers); the graph's inputs stay
    OnnxModel(model).prune_graph(allow_remove_graph_inputs=False)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save_atomic(model, Path(dst))
    return len(fused)


def compare_with_eager(vision: Idefics3Vision, path: Path, tiles, threads: int = 0) -> Tuple[float, float, float]:
    """(max abs err, mean cosine, lowest per-tile cosine) of onnxruntime vs eager on `tiles`, a
    (pixel_values, patch_mask) pair (`check_tiles`)."""
    from edge_mmm.runners.ort_session import ort_session

    pv, mask = tiles
    with torch.no_grad():
        ref = vision(pv, mask).float()
    session = ort_session(path, "ONNX vision model", threads)
    out = session.run(None, {"pixel_values": pv.float().numpy(), "patch_mask": mask.bool().numpy()})[0]
    got = torch.from_numpy(np.asarray(out, dtype=np.float32))
    err = float((got - ref).abs().max())
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1)
    return err, float(cos.mean()), float(cos.min())


def export_vision(vision: Idefics3Vision, out_dir: Path, precision: str = "fp32", opset: int = 18,
                  check: bool = True, fp32_path: Optional[Path] = None,
                  calibration: Optional[Sequence[Dict[str, np.ndarray]]] = None,
                  fused_attention: bool = False,
                  normalize: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> VisionExport:
    """Write `vision_<precision>.onnx` under `out_dir` and check it against the eager fp32 module on
    `check_tiles(vision, normalize)` (`normalize`: the checkpoint's image processor's, uint8 HWC -> float32 CHW).

    int8 (static Q/DQ, TensorRT's input) needs `calibration`: real tiles, e.g.
    `int8_calibration.vision_calibration_inputs(photos, processor, patch_size)`. int8-dynamic (CPU
    onnxruntime, `quantize_int8_dynamic`) needs none and is written as `vision_int8_dynamic.onnx`; with
    `check` it must reach mean cosine >= INT8_DYNAMIC_MIN_COSINE vs eager (EdgeMMMError otherwise).
    `fused_attention` (fp32 and int8-dynamic only: the onnxruntime backend's graphs): attention as onnxruntime's
    fused MultiHeadAttention (`fuse_attention`); an fp32 export keeps only the fused graph. A graph whose
    attention does not have the form `fuse_attention` knows (another torch version's exporter) keeps its
    unfused attention, with a RuntimeWarning: still checked, only slower."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and not calibration:
        raise InputError("int8 vision export needs calibration tiles (calibration=vision_calibration_inputs(...))")
    if fused_attention and precision not in ("fp32", "int8-dynamic"):
        raise InputError(f"fused_attention is for the onnxruntime graphs (fp32, int8-dynamic), not {precision}: "
                         f"TensorRT cannot parse com.microsoft::MultiHeadAttention")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vision = vision.float().eval()
    path = out_dir / vision_file(precision)
    base = Path(fp32_path) if fp32_path is not None else out_dir / "vision_fp32.onnx"
    scratch = []  # intermediate graphs this call writes and removes
    if fused_attention and base == path:
        base = out_dir / ".vision_fp32_unfused.onnx"
        scratch.append(base)
    try:
        if not base.is_file():
            _export_fp32(vision, base, opset)
        if fused_attention:
            fused = path if precision == "fp32" else out_dir / ".vision_fp32_fused.onnx"
            if fused != path:
                scratch.append(fused)
            try:
                fuse_attention(base, fused, vision.vision_model.config.num_attention_heads)
                base = fused
            except EdgeMMMError as exc:  # another torch's exporter wrote another pattern: still correct, slower
                warnings.warn(f"{exc}; the vision graph keeps its unfused attention", RuntimeWarning, stacklevel=2)
                if precision == "fp32":
                    os.replace(base, path)
        if precision == "fp16":
            _to_fp16(base, path)
        elif precision == "int8":
            _to_int8(base, path, calibration)
        elif precision == "int8-dynamic":
            quantize_int8_dynamic(base, path)
    finally:
        for f in scratch:
            f.unlink(missing_ok=True)
    err = cos = low = float("nan")
    if check:
        err, cos, low = compare_with_eager(vision, path, check_tiles(vision, normalize))
    if check and precision == "fp32" and not err < FP32_ATOL:
        raise EdgeMMMError(f"ONNX vision export {path}: max abs error {err:.3g} vs eager exceeds {FP32_ATOL}")
    if check and precision == "int8-dynamic" and not cos >= INT8_DYNAMIC_MIN_COSINE:
        raise EdgeMMMError(f"ONNX vision export {path}: int8-dynamic features have mean cosine {cos:.5f} vs "
                           f"eager fp32, below {INT8_DYNAMIC_MIN_COSINE}; use the fp32 export")
    return VisionExport(path, precision, err, cos, low, NATURAL_CHECK_TILES + RANDOM_CHECK_TILES if check else 0)


@dataclass
class AutoExport:
    """What `export_vision_auto` wrote, and why."""

    path: Path
    precision: str  # int8-dynamic | fp32
    int8: VisionExport  # the int8-dynamic graph's check on the photo-like tiles (cosine, min_cosine, tiles)
    reason: str


def export_vision_auto(vision: Idefics3Vision, out_dir: Path,
                       normalize: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> AutoExport:
    """Write `vision_auto.onnx` under `out_dir`, the graph `load_vlm(vision_precision="auto")` runs: the
    int8-dynamic one (fused attention) when each of the NATURAL_CHECK_TILES photo-like check tiles (through
    `normalize`) keeps cosine >= INT8_DYNAMIC_MIN_COSINE vs eager fp32 (the lowest tile decides, not the mean),
    else the fused fp32 one (checked as `export_vision` checks it). Intermediate graphs are removed."""
    import shutil

    out_dir = Path(out_dir)
    vision = vision.float().eval()
    work = out_dir / ".auto"
    try:
        base = export_vision(vision, work, "fp32", check=False).path  # unfused: both candidates derive from it
        int8 = export_vision(vision, work, "int8-dynamic", check=False, fp32_path=base, fused_attention=True)
        tiles = check_tiles(vision, normalize, n_random=0)
        err, cos, low = compare_with_eager(vision, int8.path, tiles)
        int8 = VisionExport(int8.path, int8.precision, err, cos, low, len(tiles[0]))
        rule = f"cosine >= {INT8_DYNAMIC_MIN_COSINE} vs eager fp32 on each of {int8.tiles} photo-like tiles"
        if low >= INT8_DYNAMIC_MIN_COSINE:
            chosen, reason = int8, f"int8-dynamic met {rule} (lowest {low:.6f}, mean {cos:.6f})"
        else:
            chosen = export_vision(vision, work / "fp32", "fp32", fp32_path=base, fused_attention=True,
                                   normalize=normalize)
            reason = f"int8-dynamic missed {rule} (lowest {low:.6f}, mean {cos:.6f}): fp32 runs"
        path = out_dir / vision_file("auto")
        os.replace(chosen.path, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return AutoExport(path, chosen.precision, int8, reason)
