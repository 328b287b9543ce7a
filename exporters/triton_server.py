"""`export --format triton-server`: an NVIDIA Triton Inference Server model repository from a bundle's files.

Models (those whose parts are in the set):
    vad                                Silero VAD (1/model.onnx); the caller keeps the recurrent `state`
    whisper_encoder, whisper_decoder   the Whisper graphs                    (1/model.onnx)
    whisper_transcribe                 python BLS: greedy decode loop over the two (1/model.py + tokenizer.json)
    lm                                 MatMulNBits LM with KV-cache I/O      (1/model.onnx)
    lm_generate                        python BLS, decoupled: streams one response per token over `lm`
    vision_encoder                     SigLIP + connector                    (1/model.onnx)
    vlm_embed, vlm_lm                  the VLM's token embeddings and its LM on `inputs_embeds` (1/model.onnx,
                                       built here from the bundle's packed LM: MatMulNBits, fp32 activations)
    vlm_generate                       python BLS, decoupled: vision_encoder -> splice -> vlm_lm loop, streamed
    encoders                           ensemble: the encoder stages side by side (mel [+ pixels] -> K/V [+ features])
ONNX graphs run under the `onnxruntime_onnx` platform (`backend="onnxruntime"`, for the NGC container and GPU
servers) or, with `backend="python"`, inside Python-backend models that run the same file with onnxruntime
(`data/triton_onnx_runner.py`), so the repository loads on a server that has only the Python backend (the
tritonserver in nvidia-pytriton). Input/output names, dtypes and dims (-1 = dynamic) come from the ONNX graphs.
`max_batch_size: 0` (the batch axis is part of the dims, as the graphs declare it) except the vision encoder,
which gets Triton's dynamic batcher with max_batch_size = the profile's `vision_batch` when that is > 1 (its
first axis is the tile axis, which the batcher may concatenate across requests). CPU profiles run on KIND_CPU
instances; GPU profiles on KIND_GPU, with the TensorRT execution accelerator for the encoders, or
`tensorrt_plan` for a model whose engine file is given. The decoding loops are host code (KIND_CPU); the
generation loops are decoupled models that run each request on a worker thread, so one instance streams many
answers at once. The config.pbtxt files are written by a small protobuf-text formatter (`to_pbtxt`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from edge_mmm.devices.profile import MIB, DeviceProfile
from edge_mmm.errors import ModelFileError

DATA = Path(__file__).resolve().parent / "data"
BLS_SOURCES = {"whisper_transcribe": DATA / "triton_whisper_transcribe.py",
               "lm_generate": DATA / "triton_lm_generate.py", "vlm_generate": DATA / "triton_lm_generate.py"}
ONNX_RUNNER = DATA / "triton_onnx_runner.py"
BACKENDS = ("onnxruntime", "python")
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
@dataclass(frozen=True)
class ServingOptions:
    """How the repository scales. `backend`: onnxruntime (the `onnxruntime_onnx` platform) | python (the same
    graphs run by onnxruntime in Python-backend models). `vision_batch`: the vision encoder's dynamic-batching
    limit in tiles (None: the profile's). `transcribe_instances`: instances of the Whisper loop (each decodes
    one request at a time). `max_concurrent`: generation requests one instance of lm_generate / vlm_generate
    runs at once (worker threads). `onnx_threads`: onnxruntime intra-op threads of a Python-backend graph
    (0: onnxruntime's default)."""

    backend: str = "onnxruntime"
    vision_batch: Optional[int] = None
    transcribe_instances: int = 2
    max_concurrent: int = 16
    max_tokens: int = 256
    onnx_threads: int = 0

    def validate(self) -> None:
        from edge_mmm.errors import InputError

        if self.backend not in BACKENDS:
            raise InputError(f"--triton-backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("transcribe_instances", "max_concurrent", "max_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vision_batch is not None and self.vision_batch < 1:
            raise InputError(f"vision_batch must be >= 1, got {self.vision_batch}")


def _instances(device: DeviceProfile, backend: str = "onnxruntime", count: int = 1) -> list:
    gpu = device.kind != "cpu" and backend == "onnxruntime"  # Python-backend graphs run onnxruntime on the CPU
    return [{"count": count, "kind": Enum("KIND_GPU" if gpu else "KIND_CPU")}]


def _params(values: Mapping[str, object]) -> list:
    """A ModelConfig `parameters` map; values JSON-encoded (the BLS models json.loads them)."""
    return [{"key": k, "value": {"string_value": json.dumps(v)}} for k, v in values.items()]


def _batched(specs: Sequence[TensorSpec]) -> List[TensorSpec]:
    """The specs without their first (batch) axis, for a config with max_batch_size > 0."""
    return [TensorSpec(t.name, t.data_type, t.dims[1:]) for t in specs]


def onnx_model_config(name: str, onnx_path: Path, device: DeviceProfile, tensorrt: bool = False,
                      engine: bool = False, backend: str = "onnxruntime", max_batch: int = 0,
                      threads: int = 0) -> dict:
    """config.pbtxt of one ONNX graph: onnxruntime (TensorRT accelerator if asked), a TensorRT engine, or
    (backend="python") the graph run by onnxruntime inside a Python-backend model. `max_batch` > 0 turns on
    the dynamic batcher over the graph's first axis (every input and output must have a dynamic first axis)."""
    inputs, outputs = onnx_io(onnx_path)
    if max_batch > 0:
        if any(not t.dims or t.dims[0] != -1 for t in inputs + outputs):
            raise ModelFileError(f"{onnx_path}: dynamic batching needs a dynamic first axis on every input and "
                                 f"output")
        inputs, outputs = _batched(inputs), _batched(outputs)
    cfg = {"name": name, "max_batch_size": max_batch,
           "input": [t.config() for t in inputs], "output": [t.config() for t in outputs],
           "instance_group": _instances(device, backend)}
    if backend == "python" and not engine:
        cfg = {"name": name, "backend": "python", **{k: v for k, v in cfg.items() if k != "name"},
               "parameters": _params({"intra_op_threads": threads, "batched": max_batch > 0})}
    else:
        cfg = {"name": name, "platform": "tensorrt_plan" if engine else "onnxruntime_onnx",
               **{k: v for k, v in cfg.items() if k != "name"}}
    if max_batch > 0:
        cfg["dynamic_batching"] = {}
    if tensorrt and not engine and device.kind != "cpu" and backend == "onnxruntime":
        precision = "FP16" if device.activation_dtype in ("fp16", "bf16") else "FP32"
        accel = {"name": "tensorrt", "parameters": [
            {"key": "precision_mode", "value": precision},
            {"key": "max_workspace_size_bytes", "value": str(device.trt_workspace_mib * MIB)}]}
        cfg["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accel]}}
    return cfg


def bls_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
               parameters: Mapping[str, object], instances: int = 1, decoupled: bool = False,
               optional: Sequence[str] = ()) -> dict:
    """config.pbtxt of a Python-backend model (it runs on the CPU and calls the others through BLS);
    `decoupled` models may send any number of responses per request (streaming); inputs named in
    `optional` may be left out of a request."""
    ins = []
    for t in inputs:
        msg = t.config()
        if t.name in optional:
            msg["optional"] = True
        ins.append(msg)
    cfg = {"name": name, "backend": "python", "max_batch_size": 0,
           "input": ins, "output": [t.config() for t in outputs],
           "instance_group": [{"count": instances, "kind": Enum("KIND_CPU")}], "parameters": _params(parameters)}
    if decoupled:
        cfg["model_transaction_policy"] = {"decoupled": True}
    return cfg


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


GEN_OUTPUTS = [TensorSpec("text_output", "TYPE_STRING", (1,)), TensorSpec("OUTPUT_IDS", "TYPE_INT64", (-1,))]


def write_repository(stage: Path, models: Dict[str, dict], device: DeviceProfile, repo: Path,
                     engines: Optional[Mapping[str, Path]] = None,
                     options: Optional[ServingOptions] = None) -> Dict[str, dict]:
    """Lay out the Triton repository in `repo` from bundle files in `stage`; `engines` maps a model name
    to a TensorRT engine file built for this device (served as `tensorrt_plan`). Returns `models`
    with each entry's Triton model names."""
    opts = options or ServingOptions()
    opts.validate()
    engines = dict(engines or {})
    if engines and opts.backend == "python":
        raise ModelFileError("TensorRT engines are served by the tensorrt_plan platform, not by a Python-backend "
                             "repository (--triton-backend python)")
    models = {k: dict(v) for k, v in models.items()}
    ensemble_steps = []

    def add_onnx(name: str, onnx: Path, tensorrt: bool, max_batch: int = 0) -> tuple:
        engine = engines.pop(name, None)
        if engine is None:
            onnx = scalar_inputs_as_vectors(onnx, stage / f".{name}.onnx")
        cfg = onnx_model_config(name, onnx, device, tensorrt=tensorrt, engine=engine is not None,
                                backend=opts.backend, max_batch=max_batch, threads=opts.onnx_threads)
        if engine:
            files = {"model.plan": Path(engine)}
        elif opts.backend == "python":
            files = {"model.onnx": onnx, "model.py": ONNX_RUNNER}
        else:
            files = {"model.onnx": onnx}
        _write_model(repo, name, cfg, files)
        inputs, outputs = onnx_io(onnx)
        return name, inputs, outputs

    if "vad" in models:
        add_onnx("vad", stage / "vad" / "silero_vad.onnx", tensorrt=False)
        models["vad"]["triton_models"] = ["vad"]
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
                          "n_text_ctx": wc.n_text_ctx}, instances=opts.transcribe_instances)
        _write_model(repo, "whisper_transcribe", cfg, {"model.py": BLS_SOURCES["whisper_transcribe"]},
                     [asr / "tokenizer.json", asr / "whisper_config.json"])
        models["asr"]["triton_models"] = ["whisper_encoder", "whisper_decoder", "whisper_transcribe"]
    if "lm" in models:
        lm = stage / "lm"
        io = json.loads((lm / "lm_io.json").read_text())
        add_onnx("lm", lm / "model.onnx", tensorrt=False)  # MatMulNBits / GroupQueryAttention: CUDA EP, not TRT
        stops = json.loads((lm / "generation_config.json").read_text())["eos_token_id"]
        cfg = bls_config("lm_generate",
                         [TensorSpec("INPUT_IDS", "TYPE_INT64", (-1,)), TensorSpec("text_input", "TYPE_STRING", (1,)),
                          TensorSpec("max_tokens", "TYPE_INT32", (1,))], GEN_OUTPUTS,
                         {"lm_model": "lm", "stop_ids": stops, "num_layers": io["num_layers"],
                          "num_kv_heads": io["num_kv_heads"], "head_dim": io["head_dim"],
                          "max_position_embeddings": io["max_position_embeddings"],
                          "max_tokens": opts.max_tokens, "max_concurrent": opts.max_concurrent},
                         decoupled=True, optional=("INPUT_IDS", "text_input", "max_tokens"))
        _write_model(repo, "lm_generate", cfg, {"model.py": BLS_SOURCES["lm_generate"]},
                     [lm / n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")])
        models["lm"]["triton_models"] = ["lm", "lm_generate"]
    if "vlm" in models:
        vlm = stage / "vlm"
        batch = opts.vision_batch or device.vision_batch
        vis = add_onnx("vision_encoder", vlm / "vision.onnx", tensorrt=True, max_batch=batch if batch > 1 else 0)
        if batch <= 1:  # a batching model's tensors drop the batch axis: the ensemble keeps the unbatched ones
            ensemble_steps.append(vis)
        with tempfile.TemporaryDirectory(dir=stage) as scratch:
            info = export_vlm_language_model(vlm / "lm", Path(scratch))
            add_onnx("vlm_embed", Path(scratch) / "embed.onnx", tensorrt=False)
            add_onnx("vlm_lm", Path(scratch) / "lm.onnx", tensorrt=False)
        vcfg = json.loads((vlm / "config.json").read_text())
        stops = _vlm_stop_ids(vlm)
        cfg = bls_config("vlm_generate",
                         [TensorSpec("INPUT_IDS", "TYPE_INT64", (-1,)),
                          TensorSpec("PIXEL_VALUES", "TYPE_FP32", vis[1][0].dims),
                          TensorSpec("PATCH_MASK", "TYPE_BOOL", vis[1][1].dims),
                          TensorSpec("max_tokens", "TYPE_INT32", (1,))], GEN_OUTPUTS,
                         {"lm_model": "vlm_lm", "embed_model": "vlm_embed", "vision_model": "vision_encoder",
                          "vision_output": vis[2][0].name, "vision_batch": batch,
                          "image_token_id": int(vcfg.get("image_token_id", 128257)), "stop_ids": stops,
                          **info, "max_tokens": opts.max_tokens, "max_concurrent": opts.max_concurrent},
                         decoupled=True, optional=("PIXEL_VALUES", "PATCH_MASK", "max_tokens"))
        from edge_mmm.exporters.bundle import VLM_TEXT_FILES

        _write_model(repo, "vlm_generate", cfg, {"model.py": BLS_SOURCES["vlm_generate"]},
                     [vlm / n for n in VLM_TEXT_FILES if (vlm / n).is_file()])
        models["vlm"]["triton_models"] = ["vision_encoder", "vlm_embed", "vlm_lm", "vlm_generate"]
    if engines:
        raise ModelFileError(f"TensorRT engines given for models not in the repository: {', '.join(engines)}")
    if ensemble_steps:
        _write_model(repo, ENSEMBLE, ensemble_config(ENSEMBLE, ensemble_steps))
        models["ensemble"] = {"kind": "ensemble", "triton_models": [ENSEMBLE],
                              "steps": [s[0] for s in ensemble_steps]}
    for entry in models.values():
        entry.pop("dir", None)
        entry["triton_backend"] = opts.backend
    return models


def _vlm_stop_ids(vlm: Path) -> List[int]:
    """The VLM's stop tokens, as edge-mmm's tokenizer reads them from the checkpoint's files."""
    from edge_mmm.vision.idefics3 import read_vlm_files

    return [int(t) for t in read_vlm_files(vlm, weights=False).tokenizer.stop_token_ids]


def scalar_inputs_as_vectors(path: Path, out: Path) -> Path:
    """Triton cannot pass a scalar to a non-batching model ("cannot have empty reshape ... scalar tensors are
    not supported"), so a graph with scalar inputs (the Whisper decoder's `offset`, Silero's `sr`) is served as
    a copy whose input of that name has shape [1] and is reshaped to a scalar inside the graph. Returns `path`
    itself when it has no scalar input."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    scalars = [v for v in model.graph.input if v.name not in inits and v.type.tensor_type.HasField("shape")
               and len(v.type.tensor_type.shape.dim) == 0]
    if not scalars:
        return path
    g = model.graph
    nodes = []
    for v in scalars:
        inner = f"{v.name}__scalar"
        for node in g.node:
            for k, name in enumerate(node.input):
                if name == v.name:
                    node.input[k] = inner
        for sub_out in g.output:
            if sub_out.name == v.name:
                raise ModelFileError(f"{path}: scalar input {v.name} is also an output; cannot serve it")
        shape = f"{v.name}__scalar_shape"
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros((0,), np.int64), shape))
        nodes.append(helper.make_node("Reshape", [v.name, shape], [inner], name=f"{v.name}__to_scalar"))
        v.type.tensor_type.shape.dim.add().dim_value = 1
    for n in reversed(nodes):
        g.node.insert(0, n)
    onnx.save(model, str(out))
    return out


# --------------------------------------------------------------------------------------------- VLM LM
def export_vlm_language_model(packed_dir: Path, out: Path) -> dict:
    """The VLM's packed LM (`save_quantized` folder) as two ONNX graphs in `out`: `embed.onnx` (input_ids ->
    inputs_embeds, the embedding table as torch computes it) and `lm.onnx` (edge-mmm's LM graph of
    exporters/onnx_lm.py fed `inputs_embeds` [batch, seq, hidden] instead of `input_ids`; fp32 activations
    and the head as it is, so it computes what the torch LM computes). Returns the loop's parameters."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    from edge_mmm.exporters.onnx_lm import MS_DOMAIN, OPSET, OnnxLMOptions, build_llama_onnx
    from edge_mmm.weights.quantized import load_quantized_llama

    model = load_quantized_llama(packed_dir).eval()
    cfg = model.config
    proto = build_llama_onnx(model, OnnxLMOptions(accuracy_level=0, head_bits=None, inputs_embeds=True))
    with torch.no_grad():
        table = model.embed_tokens(torch.arange(cfg.vocab_size)).float().numpy()
    onnx.save(proto, str(out / "lm.onnx"))
    emb = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens", "input_ids"], ["inputs_embeds"], axis=0)], "vlm_embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])],
        [onnx.numpy_helper.from_array(np.ascontiguousarray(table), "embed_tokens")])
    emb_model = helper.make_model(emb, opset_imports=[helper.make_opsetid("", OPSET),
                                                      helper.make_opsetid(MS_DOMAIN, 1)], producer_name="edge-mmm")
    emb_model.ir_version = 8
    onnx.save(emb_model, str(out / "embed.onnx"))
    return {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings}
