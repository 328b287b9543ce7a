"""Which ONNX ops TensorRT's ONNX parser accepts, and a checker for the graphs we hand to TensorRT.

The list is data (`data/tensorrt_supported_ops.json`), transcribed from onnx-tensorrt's
`docs/operators.md` with the document and version it came from. It describes the published parser,
not an install: on the device, parsing with the installed `tensorrt.OnnxParser` is the final word.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from edge_mmm.errors import InputError, ModelFileError

DATA_FILE = Path(__file__).resolve().parent / "data" / "tensorrt_supported_ops.json"
DEFAULT_TRT_VERSION = "10.3"  # JetPack 6.1/6.2
ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpSupport:
    """The supported-operator list for one TensorRT version."""

    list_version: str  # which published list applies
    document: str
    opset_min: int
    opset_max: int
    supported: Dict[str, dict]  # op -> {"types": [...], "restrictions": "..."}
    unsupported: Tuple[str, ...]


@dataclass
class TensorRTOpReport:
    """Result of checking one ONNX file: checker status, op counts, what TensorRT cannot parse."""

    model: str
    trt_version: str
    list_version: str
    opsets: Dict[str, int]
    checker_ok: bool
    checker_error: str = ""
    op_counts: Dict[str, int] = field(default_factory=dict)  # "domain::Op" or "Op" -> count
    unsupported: List[str] = field(default_factory=list)
    plugin_ops: List[str] = field(default_factory=list)  # ops handled by our plugins
    restricted: Dict[str, str] = field(default_factory=dict)  # supported ops with restrictions to verify
    opset_error: str = ""

    @property
    def ok(self) -> bool:
        return self.checker_ok and not self.unsupported and not self.opset_error

    def to_dict(self) -> dict:
        return {"model": self.model, "trt_version": self.trt_version, "list_version": self.list_version,
                "opsets": self.opsets, "checker_ok": self.checker_ok, "checker_error": self.checker_error,
                "op_counts": self.op_counts, "unsupported": self.unsupported, "plugin_ops": self.plugin_ops,
                "restricted": self.restricted, "opset_error": self.opset_error, "ok": self.ok}


def _version_tuple(v: str) -> Tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split(".")[:2])
    except ValueError as exc:
        raise InputError(f"bad TensorRT version '{v}' (expected e.g. 10.3)") from exc


@lru_cache(maxsize=None)
def _data() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def supported_ops(trt_version: str = DEFAULT_TRT_VERSION) -> OpSupport:
    """The newest published list not newer than `trt_version` (TensorRT 10.x only)."""
    want = _version_tuple(trt_version)
    if want[0] != 10:
        raise InputError(f"only TensorRT 10.x lists are recorded, got {trt_version}")
    lists = _data()["lists"]
    usable = sorted((v for v in lists if _version_tuple(v) <= want), key=_version_tuple)
    if not usable:
        usable = [min(lists, key=_version_tuple)]  # 10.0 is documented by the 10.1 list's header
    ver = usable[-1]
    entry = lists[ver]
    supported = dict(lists[entry["extends"]]["supported"]) if "extends" in entry else {}
    supported.update(entry["supported"])
    return OpSupport(ver, entry["document"], entry["opset_min"], entry["opset_max"], supported,
                     tuple(entry["unsupported"]))


def check_onnx_for_tensorrt(model_path: Union[str, Path], plugin_ops: Optional[Iterable[str]] = None,
                            trt_version: str = DEFAULT_TRT_VERSION) -> TensorRTOpReport:
    """Run `onnx.checker` on the model and list the ops TensorRT's parser does not support.

    `plugin_ops` names ops our TensorRT plugins implement ("Op" or "domain::Op"); they are allowed. Default:
    the plugins of exporters/tensorrt_plugins.py (`edge_mmm::rms_norm`, ...). Ops in other domains (e.g. com.microsoft) are unsupported unless listed as plugins. Subgraphs of
    If/Loop/Scan are walked too.
    """
    import onnx

    path = Path(model_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / various on garbage
        raise ModelFileError(f"{path}: not a readable ONNX model ({exc})") from exc
    support = supported_ops(trt_version)
    checker_ok, checker_error = True, ""
    try:
        onnx.checker.check_model(str(path), full_check=False)  # path form handles >2 GB / external data
    except onnx.checker.ValidationError as exc:
        checker_ok, checker_error = False, str(exc).strip().splitlines()[0]

    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
            counts[key] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    if plugin_ops is None:
        from edge_mmm.exporters.tensorrt_plugins import plugin_op_names

        plugin_ops = plugin_op_names()
    plugins = set(plugin_ops)
    unsupported, used_plugins, restricted = [], [], {}
    for key in sorted(counts):
        op = key.split("::")[-1]
        if key in plugins or (op in plugins and "::" not in key):
            used_plugins.append(key)
        elif "::" in key or op not in support.supported:
            unsupported.append(key)
        elif support.supported[op].get("restrictions"):
            restricted[op] = support.supported[op]["restrictions"]
    opsets = {(imp.domain or "ai.onnx"): imp.version for imp in model.opset_import}
    opset_error = ""
    ai = opsets.get("ai.onnx")
    if ai is not None and not support.opset_min <= ai <= support.opset_max:
        opset_error = (f"ai.onnx opset {ai} is outside TensorRT {support.list_version}'s range "
                       f"{support.opset_min}-{support.opset_max}")
    return TensorRTOpReport(str(path), trt_version, support.list_version, opsets, checker_ok, checker_error,
                            dict(counts), unsupported, used_plugins, restricted, opset_error)
