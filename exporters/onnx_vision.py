"""ONNX export of the Idefics3 vision part (SigLIP tower + pixel-shuffle connector), checked against eager.

Graph: `pixel_values` (N, 3, S, S) float, `patch_mask` (N, S/p, S/p) bool -> `image_features`
(N, image_seq_len, text_dim), N dynamic. FP32 is exported directly; FP16 is the FP32 graph converted with
onnxruntime's float16 converter (inputs/outputs stay float32/bool so callers need not care); INT8 is
onnxruntime dynamic quantization of the MatMul weights. Every export is run once with onnxruntime on random
tiles and compared with the eager module (max abs error returned; FP32 must be < 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from edge_mmm.errors import EdgeMMMError, InputError
from edge_mmm.models.idefics3 import Idefics3Vision

FP32_ATOL = 1e-4  # stated tolerance of the FP32 export vs eager
INPUT_NAMES = ("pixel_values", "patch_mask")
OUTPUT_NAME = "image_features"


@dataclass
class VisionExport:
    path: Path
    precision: str  # fp32 | fp16 | int8
    max_abs_err: float
    cosine: float  # mean cosine similarity of features vs eager


def _dummy_inputs(vision: Idefics3Vision, n: int, seed: int = 0):
    s = vision.vision_model.config.image_size
    p = vision.patch_size
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(n, 3, s, s, generator=g)
    mask = torch.ones(n, s // p, s // p, dtype=torch.bool)
    return pv, mask


def _export_fp32(vision: Idefics3Vision, path: Path, opset: int) -> None:
    pv, mask = _dummy_inputs(vision, 2)
    n = torch.export.Dim("n_tiles", min=1, max=256)
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
    onnx.save(model16, str(dst))


def _to_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])


def compare_with_eager(vision: Idefics3Vision, path: Path, n: int = 3, threads: int = 0):
    """(max abs err, mean cosine) of onnxruntime vs eager on `n` random tiles."""
    from edge_mmm.vision.backends import OrtVisionEncoder

    pv, mask = _dummy_inputs(vision, n, seed=1)
    with torch.no_grad():
        ref = vision(pv, mask).float()
    got = OrtVisionEncoder(path, threads=threads)(pv, mask)
    err = float((got - ref).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1).mean())
    return err, cos


def export_vision(vision: Idefics3Vision, out_dir: Path, precision: str = "fp32", opset: int = 18,
                  check: bool = True, fp32_path: Optional[Path] = None) -> VisionExport:
    """Write `vision_<precision>.onnx` under `out_dir` and check it against the eager fp32 module."""
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vision = vision.float().eval()
    base = Path(fp32_path) if fp32_path is not None else out_dir / "vision_fp32.onnx"
    if not base.is_file():
        _export_fp32(vision, base, opset)
    path = out_dir / f"vision_{precision}.onnx"
    if precision == "fp16":
        _to_fp16(base, path)
    elif precision == "int8":
        _to_int8(base, path)
    err, cos = compare_with_eager(vision, path) if check else (float("nan"), float("nan"))
    if check and precision == "fp32" and not err < FP32_ATOL:
        raise EdgeMMMError(f"ONNX vision export {path}: max abs error {err:.3g} vs eager exceeds {FP32_ATOL}")
    return VisionExport(path, precision, err, cos)
