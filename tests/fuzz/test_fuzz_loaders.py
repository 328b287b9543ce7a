"""Fuzz the loaders of untrusted files (issue 18): >= 200 seeded mutations per family (GGUF, safetensors,
CTranslate2 model.bin, ONNX, bundle manifests, audio containers, images), in process. Each case must load
or end in the project's typed error (EdgeMMMError; the servers' ApiError for request bodies) -- never
another exception, a hang (each case is timed) or a memory blow-up (per family: the tracemalloc peak, which sees Python and numpy allocations, and the
growth of the process's RSS high-water mark, which sees the rest).

Deterministic: case i of a family uses `random.Random(f"{family}-{i}")`; a failure names the case and its
edits, so `mutate(seed_bytes, Random(...))` reproduces it. Counts print as one table (`pytest -s`).
"""

from __future__ import annotations

import io
import json
import random
import resource
import struct
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_mmm.errors import EdgeMMMError

from .mutate import mutate

CASES = 200
MAX_CASE_S = 10.0  # a case slower than this is a hang (they take milliseconds)
MAX_PEAK_BYTES = 512 << 20  # traced (Python + numpy) allocations at once, per family
MAX_RSS_GROWTH_KIB = 1 << 20  # growth of the RSS high-water mark over a family (1 GiB)
RESULTS = {}


def run_family(family: str, seeds, target, typed=(EdgeMMMError,), hot=4096) -> Counter:
    """Mutate each seed file in turn, `CASES` cases in all; `target(bytes)` must succeed or raise `typed`."""
    outcomes, slowest = Counter(), 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        for i in range(CASES):
            seed = seeds[i % len(seeds)]
            data, edits = mutate(seed, random.Random(f"{family}-{i}"), hot)
            t0 = time.perf_counter()
            try:
                target(data)
                outcomes["loaded"] += 1
            except typed as exc:
                outcomes[type(exc).__name__] += 1
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{family} case {i} ({', '.join(edits)}): untyped {type(exc).__name__}: {exc}")
            dt = time.perf_counter() - t0
            slowest = max(slowest, dt)
            assert dt < MAX_CASE_S, f"{family} case {i} ({', '.join(edits)}) took {dt:.1f} s"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"{family}: {peak / 2**20:.0f} MiB traced at once"
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert rss_growth < MAX_RSS_GROWTH_KIB, f"{family}: RSS high-water mark grew {rss_growth >> 10} MiB"
    assert sum(outcomes.values()) == CASES
    RESULTS[family] = dict(outcomes, slowest_ms=round(slowest * 1e3, 1), peak_mib=round(peak / 2**20, 1))
    print(f"\nfuzz {family:12s} {CASES} cases: {dict(outcomes)}  slowest {slowest * 1e3:.0f} ms  "
          f"peak {peak / 2**20:.1f} MiB", file=sys.stderr)
    return outcomes


def _file_target(path: Path, load):
    def target(data: bytes):
        path.write_bytes(data)
        load(path)
    return target


# ------------------------------------------------------------------------------------------------ GGUF
def _tiny_gguf(path: Path) -> bytes:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    hidden, inter, vocab, heads, kv = 32, 64, 48, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", hidden),
                       ("feed_forward_length", inter), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv), ("vocab_size", vocab)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    hd = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv * hd, hidden),
              "blk.0.attn_v.weight": (kv * hd, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (inter, hidden), "blk.0.ffn_up.weight": (inter, hidden),
              "blk.0.ffn_down.weight": (hidden, inter)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_fuzz_gguf(tmp_path, monkeypatch):
    import types

    from edge_mmm.models.llama import build_llama
    from edge_mmm.weights import gguf_lm
    from edge_mmm.weights.gguf_lm import load_gguf_lm

    # the loader's full garbage collections (after a real load they hand the reader's heap back) scan all of
    # pytest's objects, ~0.15 s each here, most of this test's time; Python's own collections still run
    monkeypatch.setattr(gguf_lm, "gc", types.SimpleNamespace(collect=lambda *a: 0))
    seed = _tiny_gguf(tmp_path / "seed.gguf")

    def load(path):
        cfg, state, _ = load_gguf_lm(path)
        build_llama(cfg, state)

    load(tmp_path / "seed.gguf")  # the unmutated file loads
    run_family("gguf", [seed], _file_target(tmp_path / "case.gguf", load), hot=1024)


# ----------------------------------------------------------------------------------------- safetensors
def test_fuzz_safetensors(tmp_path):
    from safetensors.numpy import save_file

    from edge_mmm.models.llama import build_llama
    from edge_mmm.weights.hf_lm import load_hf_lm

    rng = np.random.default_rng(1)
    hidden, inter, vocab = 32, 64, 48
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
              p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (16, hidden),
              p + "self_attn.v_proj.weight": (16, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
              p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
              p + "mlp.down_proj.weight": (hidden, inter)}
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, str(d / "model.safetensors"))
    seed = (d / "model.safetensors").read_bytes()

    def load(_):
        c, state = load_hf_lm(d)
        build_llama(c, state)

    load(d)
    header = 8 + struct.unpack("<Q", seed[:8])[0]
    run_family("safetensors", [seed], _file_target(d / "model.safetensors", load), hot=header)


# ------------------------------------------------------------------------------------------ CT2 model.bin
def _ct2_bytes(version: int, variables: dict, aliases: dict) -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version)
    if version >= 2:
        out += s("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}
    for name, arr in variables.items():
        out += s(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        if version >= 4:
            out += struct.pack("<BI", codes[arr.dtype], arr.nbytes)
        else:
            out += struct.pack("<BI", arr.itemsize, arr.size)
        out += arr.tobytes()
    if version >= 3:
        out += struct.pack("<I", len(aliases))
        for a, t in aliases.items():
            out += s(a) + s(t)
    return out


def test_fuzz_ct2_model_bin(tmp_path):
    from edge_mmm.weights.ct2 import read_ct2_model

    rng = np.random.default_rng(2)
    variables = {"encoder/conv1/weight": rng.standard_normal((8, 4, 3)).astype(np.float32),
                 "encoder/conv1/bias": rng.standard_normal(8).astype(np.float16),
                 "decoder/embeddings/weight": rng.integers(-100, 100, (16, 8)).astype(np.int8),
                 "decoder/scale": np.array([3], np.int32)}
    seeds = [_ct2_bytes(v, variables, {"decoder/projection/weight": "decoder/embeddings/weight"}) for v in (6, 3, 1)]
    path = tmp_path / "model.bin"
    for seed in seeds:
        path.write_bytes(seed)
        assert set(read_ct2_model(path).variables) == set(variables)
    run_family("ct2", seeds, _file_target(path, read_ct2_model), hot=512)


# ------------------------------------------------------------------------------------------------ ONNX
def test_fuzz_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from edge_mmm.vision.backends import OrtVisionEncoder

    pv = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 4, 4])
    pm = helper.make_tensor_value_info("patch_mask", TensorProto.BOOL, [1, 4, 4])
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, 4, 4])
    w = numpy_helper.from_array(np.full((1, 3, 4, 4), 0.5, np.float32), "w")
    nodes = [helper.make_node("Mul", ["pixel_values", "w"], ["m"]),
             helper.make_node("Cast", ["patch_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axis"], ["mfu"]),
             helper.make_node("Mul", ["m", "mfu"], ["features"])]
    axis = numpy_helper.from_array(np.array([1], np.int64), "axis")
    graph = helper.make_graph(nodes, "vision", [pv, pm], [out], initializer=[w, axis])
    seed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    path = tmp_path / "vision.onnx"
    path.write_bytes(seed)
    OrtVisionEncoder(path, patch_size=4)
    run_family("onnx", [seed], _file_target(path, lambda p: OrtVisionEncoder(p, patch_size=4)), hot=len(seed))


# ------------------------------------------------------------------------------------------- bundles
def test_fuzz_bundle_manifest(tmp_path):
    from edge_mmm.bundle import MANIFEST, open_bundle

    from bundle_forge import ASR, asr_files, write_bundle

    b = write_bundle(tmp_path / "b", asr_files(), ASR)
    seed = (b / MANIFEST).read_bytes()
    manifest = json.loads(seed)
    # structural seeds too: byte edits rarely keep JSON valid, these do
    variants = [seed]
    for key, value in (("context", 10 ** 9), ("dir", "../b"), ("dir", "/"), ("bytes", -1), ("sha256", "0" * 64)):
        m = json.loads(seed)
        if key == "context":
            m["plan"]["request"]["context"] = value
        elif key == "dir":
            m["models"]["asr"]["dir"] = value
        else:
            m["files"]["asr/encoder.onnx"][key] = value
        variants.append(json.dumps(m).encode())
    assert manifest["files"]

    def load(data: bytes):
        (b / MANIFEST).write_bytes(data)
        bundle = open_bundle(b)
        bundle.load_asr()

    run_family("bundle", variants, load, hot=len(seed))


# --------------------------------------------------------------------------------------------- audio
def _audio_seeds() -> list:
    import wave

    import av

    t = np.arange(8000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    seeds = [buf.getvalue()]
    for fmt, codec, rate in (("flac", "flac", 16000), ("mp3", "libmp3lame", 16000), ("ogg", "libopus", 48000),
                             ("mp4", "aac", 16000)):
        if codec not in av.codecs_available:
            continue
        out = io.BytesIO()
        with av.open(out, "w", format=fmt) as c:
            s = c.add_stream(codec, rate=rate, layout="mono")
            frame = av.AudioFrame.from_ndarray(tone.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = 16000
            for f in av.AudioResampler(format=s.codec_context.format.name, layout="mono", rate=rate).resample(frame):
                for packet in s.encode(f):
                    c.mux(packet)
            for packet in s.encode(None):
                c.mux(packet)
        seeds.append(out.getvalue())
    return seeds


def test_fuzz_audio_containers():
    from edge_mmm.audio.io import decode_audio

    seeds = _audio_seeds()
    for seed in seeds:
        assert decode_audio(seed, "seed").size > 4000
    assert len(seeds) >= 3
    run_family("audio", seeds, lambda data: decode_audio(data, "fuzz", max_seconds=30), hot=1024)


# -------------------------------------------------------------------------------------------- images
def test_fuzz_images():
    import base64

    from PIL import Image

    from edge_mmm.serve.app import _image_bytes
    from edge_mmm.serve.demo import decode_frame
    from edge_mmm.serve.guard import ApiError
    from edge_mmm.serve.settings import ServeSettings
    from edge_mmm.vision.processor import load_image

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    seeds = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("WEBP", {}), ("BMP", {}),
                    ("JPEG", {"progressive": True})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        seeds.append(buf.getvalue())
    settings = ServeSettings()

    def load(data: bytes):
        outcome = None
        for step in (lambda: load_image(data), lambda: decode_frame(data, settings.max_image_pixels, 64 * 64),
                     lambda: _image_bytes("data:image/png;base64," + base64.b64encode(data).decode(), settings)):
            try:
                step()
            except (EdgeMMMError, ApiError) as exc:
                outcome = exc
        if outcome is not None:
            raise outcome

    run_family("image", seeds, load, typed=(EdgeMMMError, ApiError), hot=256)


def test_fuzz_json_request_bodies():
    """The servers' JSON body parser: malformed, NaN, deep or huge-number bodies are ApiError(400)."""
    from edge_mmm.serve.app import generation_config, parse_messages
    from edge_mmm.serve.guard import ApiError, parse_json
    from edge_mmm.serve.settings import ServeSettings

    settings = ServeSettings()
    seed = json.dumps({"model": "x", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n"]}).encode()

    def load(data: bytes):
        body = parse_json(data)
        parse_messages(body, settings)
        generation_config(body, settings.max_tokens)

    run_family("json", [seed], load, typed=(ApiError,), hot=len(seed))

