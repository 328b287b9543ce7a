"""`export --format triton-server`: an NVIDIA Triton Inference Server model repository from a bundle's files.

Models (those whose parts are in the set):
    whisper_encoder, whisper_decoder   onnxruntime: the Whisper graphs      (1/model.onnx)
    whisper_transcribe                 python BLS: greedy decode loop over the two (1/model.py + tokenizer.json)
    lm                                 onnxruntime: MatMulNBits LM with KV-cache I/O (1/model.onnx)
    lm_generate                        python BLS: greedy generation loop over `lm` (1/model.py + tokenizer files)
    vision_encoder                     onnxruntime: SigLIP + connector (1/model.onnx)
    encoders                           ensemble: the encoder stages side by side (mel [+ pixels] -> K/V [+ features])
Input/output names, dtypes and dims (-1 = dynamic) come from the ONNX graphs. `max_batch_size: 0`: the
batch axis is part of the dims, as the graphs declare it. CPU profiles run on KIND_CPU instances; GPU
profiles on KIND_GPU, with the TensorRT execution accelerator for the encoders, or `tensorrt_plan` for a
model whose engine file is given. The VLM's LM (torch + our kernels) and the VAD are not Triton models.
The config.pbtxt files are written by a small protobuf-text formatter (`to_pbtxt`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from edge_mmm.devices.profile import MIB, DeviceProfile
from edge_mmm.errors import ModelFileError

DATA = Path(__file__).resolve().parent / "data"
BLS_SOURCES = {"whisper_transcribe": DATA / "triton_whisper_transcribe.py",
               "lm_generate": DATA / "triton_lm_generate.py"}
VERSION = "1"
ENSEMBLE = "encoders"
# ONNX TensorProto element type -> Triton data type
TRITON_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}


class Enum(str):
    """A protobuf enum value: written bare (TYPE_FP32), not quoted."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # TYPE_*
    dims: tuple  # -1 for a dynamic axis; () for a scalar

    def config(self) -> dict:
        """The ModelInput/ModelOutput message; a scalar is sent as [1] and reshaped to []."""
        msg = {"name": self.name, "data_type": Enum(self.data_type), "dims": list(self.dims) or [1]}
        if not self.dims:
            msg["reshape"] = {"shape": []}
        return msg


# --------------------------------------------------------------------------------------------- pbtxt
def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot write {type(value).__name__} as protobuf text")


def to_pbtxt(message: Mapping, indent: int = 0) -> str:
    """Protobuf text format of a message given as a dict: dict = message, list = repeated field,
    `Enum` = enum value; a map field is a list of {"key": ..., "value": ...} messages."""
    pad = "  " * indent
    lines: List[str] = []
    for key, value in message.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(v, Mapping) for v in value):
                for v in value:
                    lines += [f"{pad}{key} {{", to_pbtxt(v, indent + 1), f"{pad}}}"]
            else:
                lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------------- ONNX I/O
def onnx_io(path: Path):
    """(inputs, outputs) of an ONNX graph as TensorSpecs (initializers excluded; symbolic dims -> -1)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelFileError(f"cannot read ONNX model {path}: {exc}") from exc
    inits = {i.name for i in model.graph.initializer}

    def spec(vi) -> TensorSpec:
        t = vi.type.tensor_type
        if t.elem_type not in TRITON_DTYPES:
            raise ModelFileError(f"{path}: tensor {vi.name} has ONNX type {t.elem_type}, which Triton cannot serve")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(vi.name, TRITON_DTYPES[t.elem_type], dims)

    return ([spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output])


# --------------------------------------------------------------------------------------------- configs
def _instances(device: DeviceProfile) -> list:
    return [{"count": 1, "kind": Enum("KIND_CPU" if device.kind == "cpu" else "KIND_GPU")}]


def _params(values: Mapping[str, object]) -> list:
    """A ModelConfig `parameters` map; values JSON-encoded (the BLS models json.loads them)."""
    return [{"key": k, "value": {"string_value": json.dumps(v)}} for k, v in values.items()]


def onnx_model_config(name: str, onnx_path: Path, device: DeviceProfile, tensorrt: bool = False,
                      engine: bool = False) -> dict:
    """config.pbtxt of one ONNX graph: onnxruntime (TensorRT accelerator if asked) or a TensorRT engine."""
    inputs, outputs = onnx_io(onnx_path)
    cfg = {"name": name, "platform": "tensorrt_plan" if engine else "onnxruntime_onnx", "max_batch_size": 0,
           "input": [t.config() for t in inputs], "output": [t.config() for t in outputs],
           "instance_group": _instances(device)}
    if tensorrt and not engine and device.kind != "cpu":
        precision = "FP16" if device.activation_dtype in ("fp16", "bf16") else "FP32"
        accel = {"name": "tensorrt", "parameters": [
            {"key": "precision_mode", "value": precision},
            {"key": "max_workspace_size_bytes", "value": str(device.trt_workspace_mib * MIB)}]}
        cfg["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accel]}}
    return cfg


def bls_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
               parameters: Mapping[str, object]) -> dict:
    """config.pbtxt of a Python-backend model (it runs on the CPU and calls the others through BLS)."""
    return {"name": name, "backend": "python", "max_batch_size": 0,
            "input": [t.config() for t in inputs], "output": [t.config() for t in outputs],
            "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}], "parameters": _params(parameters)}


def ensemble_config(name: str, steps: Sequence[tuple]) -> dict:
    """An ensemble running `steps` = [(model name, inputs, outputs)] side by side; tensors keep their names."""
    ins, outs = {}, {}
    for _, inputs, outputs in steps:
        ins.update({t.name: t for t in inputs})
        outs.update({t.name: t for t in outputs})
    sched = [{"model_name": model, "model_version": -1,
              "input_map": [{"key": t.name, "value": t.name} for t in inputs],
              "output_map": [{"key": t.name, "value": t.name} for t in outputs]} for model, inputs, outputs in steps]
    return {"name": name, "platform": "ensemble", "max_batch_size": 0,
            "input": [t.config() for t in ins.values()], "output": [t.config() for t in outs.values()],
            "ensemble_scheduling": {"step": sched}}


def _write_model(repo: Path, name: str, config: dict, files: Mapping[str, Path] = (),
                 extra: Sequence[Path] = ()) -> None:
    """`repo/name/config.pbtxt`, `repo/name/1/<files>` and `extra` files beside the config."""
    d = repo / name
    (d / VERSION).mkdir(parents=True)
    (d / "config.pbtxt").write_text(to_pbtxt(config) + "\n")
    for dst, src in dict(files).items():
        shutil.copyfile(src, d / VERSION / dst)
    for src in extra:
        shutil.copyfile(src, d / src.name)


def write_repository(stage: Path, models: Dict[str, dict], device: DeviceProfile, repo: Path,
                     engines: Optional[Mapping[str, Path]] = None) -> Dict[str, dict]:
    """Lay out the Triton repository in `repo` from bundle files in `stage`; `engines` maps a model name
    to a TensorRT engine file built for this device (served as `tensorrt_plan`). Returns `models`
    with each entry's Triton model names."""
    engines = dict(engines or {})
    models = {k: dict(v) for k, v in models.items() if k != "vad"}  # VAD runs beside the client, not here
    ensemble_steps = []

    def add_onnx(name: str, onnx: Path, tensorrt: bool) -> tuple:
        engine = engines.pop(name, None)
        cfg = onnx_model_config(name, onnx, device, tensorrt=tensorrt, engine=engine is not None)
        _write_model(repo, name, cfg, {"model.plan": Path(engine)} if engine else {"model.onnx": onnx})
        inputs, outputs = onnx_io(onnx)
        return name, inputs, outputs

    if "asr" in models:
        asr = stage / "asr"
        wcfg = json.loads((asr / "whisper_config.json").read_text())
        enc = add_onnx("whisper_encoder", asr / "encoder.onnx", tensorrt=True)
        add_onnx("whisper_decoder", asr / "decoder.onnx", tensorrt=False)
        ensemble_steps.append(enc)
        from edge_mmm.asr.tokenizer import WhisperTokenizer
        from edge_mmm.models.whisper import WhisperConfig

        wc = WhisperConfig(**wcfg)
        tok = WhisperTokenizer.from_file(asr / "tokenizer.json", wc.n_vocab, wc.is_multilingual, wc.num_languages)
        mel = next(t for t in enc[1] if t.name == "mel")
        cfg = bls_config("whisper_transcribe",
                         [TensorSpec("MEL", "TYPE_FP32", (1,) + mel.dims[1:]),
                          TensorSpec("PROMPT_IDS", "TYPE_INT64", (-1,)),
                          TensorSpec("SUPPRESS_IDS", "TYPE_INT64", (-1,)),
                          TensorSpec("BEGIN_SUPPRESS_IDS", "TYPE_INT64", (-1,)),
                          TensorSpec("MAX_NEW_TOKENS", "TYPE_INT32", (1,))],
                         [TensorSpec("TOKEN_IDS", "TYPE_INT64", (-1,))],
                         {"encoder_model": "whisper_encoder", "decoder_model": "whisper_decoder", "eot": tok.eot,
                          "n_text_layer": wc.n_text_layer, "n_text_state": wc.n_text_state,
                          "n_text_ctx": wc.n_text_ctx})
        _write_model(repo, "whisper_transcribe", cfg, {"model.py": BLS_SOURCES["whisper_transcribe"]},
                     [asr / "tokenizer.json"])
        models["asr"]["triton_models"] = ["whisper_encoder", "whisper_decoder", "whisper_transcribe"]
    if "lm" in models:
        lm = stage / "lm"
        io = json.loads((lm / "lm_io.json").read_text())
        add_onnx("lm", lm / "model.onnx", tensorrt=False)  # MatMulNBits / GroupQueryAttention: CUDA EP, not TRT
        stops = json.loads((lm / "generation_config.json").read_text())["eos_token_id"]
        cfg = bls_config("lm_generate",
                         [TensorSpec("INPUT_IDS", "TYPE_INT64", (-1,)),
                          TensorSpec("MAX_NEW_TOKENS", "TYPE_INT32", (1,))],
                         [TensorSpec("OUTPUT_IDS", "TYPE_INT64", (-1,))],
                         {"lm_model": "lm", "stop_ids": stops, "num_layers": io["num_layers"],
                          "num_kv_heads": io["num_kv_heads"], "head_dim": io["head_dim"],
                          "max_position_embeddings": io["max_position_embeddings"]})
        _write_model(repo, "lm_generate", cfg, {"model.py": BLS_SOURCES["lm_generate"]},
                     [lm / n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")])
        models["lm"]["triton_models"] = ["lm", "lm_generate"]
    if "vlm" in models:
        ensemble_steps.append(add_onnx("vision_encoder", stage / "vlm" / "vision.onnx", tensorrt=True))
        models["vlm"]["triton_models"] = ["vision_encoder"]
        models["vlm"]["not_served"] = "the VLM's language model (torch + edge-mmm kernels) is not a Triton model"
    if engines:
        raise ModelFileError(f"TensorRT engines given for models not in the repository: {', '.join(engines)}")
    if ensemble_steps:
        _write_model(repo, ENSEMBLE, ensemble_config(ENSEMBLE, ensemble_steps))
        models["ensemble"] = {"kind": "ensemble", "triton_models": [ENSEMBLE],
                              "steps": [s[0] for s in ensemble_steps]}
    for entry in models.values():
        entry.pop("dir", None)
    return models
