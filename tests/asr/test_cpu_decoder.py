"""Whisper's text decoder on edge-mmm's C kernel (`runners.cpu_whisper`, `edge_whisper_step` in cpu_lm.c) and
the pack it reads (exporters/whisper_decoder_pack.py).

Tolerances: logits within 1e-5 * max|logit| of the eager torch decoder (fp32 sums in another order) on every
instruction-set path, through a prompt, decode steps, several rows at once and a batch of hypotheses; the
onnxruntime backend with the C decoder within 1e-4 * max|logit| of the same backend on the decoder graph
(beam reorder and a draft's truncation included). tests/asr/test_parity.py checks openai-whisper's greedy and
beam-search tokens through the same path on the shipped tiny.en.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_mmm.asr.backends import OnnxWhisperBackend
from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.exporters.whisper_decoder_pack import write_decoder_pack
from edge_mmm.models.whisper import Whisper, WhisperConfig
from edge_mmm.models.whisper_config import DECODER_FILE, ENCODER_FILE
from edge_mmm.runners.cpu_lm import compile_library
from edge_mmm.runners.cpu_whisper import (DECODER_PACK_BIN, DECODER_PACK_JSON, CpuWhisperDecoder,
                                          read_decoder_pack)
from kernel_host import kernel_missing

X86 = platform.machine() == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text()
VARIANTS = {"native": None, **({"avx2": ["-march=haswell"], "generic": ["-march=x86-64"]} if X86 else {})}

CFG = WhisperConfig(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=1,
                    n_vocab=51864, n_text_ctx=64, n_text_state=64, n_text_head=4, n_text_layer=2)


def _model(fp16: bool, seed: int = 3, cfg: WhisperConfig = CFG) -> Whisper:
    """A random Whisper; `fp16`: every weight matrix and the token table hold fp16 values (as checkpoints do)."""
    torch.manual_seed(seed)
    model = Whisper(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        if fp16:
            for p in model.decoder.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("fp16", [True, False], ids=["fp16-weights", "fp32-weights"])
def test_c_decoder_matches_the_torch_decoder(variant, fp16, tmp_path):
    """A prompt of 3, single steps, 5 rows at once, for 1 and 3 hypotheses; a head size that is not a multiple of
    the vector width (d=72, 6 heads of 12) and a vocabulary ending in a partial chunk on the second config; a width
    that is not one either (d=36, 6 heads of 6) and 7 audio positions on the third."""
    lib, isa = compile_library(tmp_path / "lib", VARIANTS[variant])
    if lib is None:
        kernel_missing(isa)
    assert variant == "native" or isa == variant
    odd = WhisperConfig(n_mels=80, n_audio_ctx=30, n_audio_state=72, n_audio_head=6, n_audio_layer=1,
                        n_vocab=1003, n_text_ctx=24, n_text_state=72, n_text_head=6, n_text_layer=3)
    narrow = WhisperConfig(n_mels=80, n_audio_ctx=7, n_audio_state=36, n_audio_head=6, n_audio_layer=1,
                           n_vocab=517, n_text_ctx=16, n_text_state=36, n_text_head=6, n_text_layer=1)
    for cfg in (CFG, odd, narrow):
        model = _model(fp16, cfg=cfg)
        out = tmp_path / f"pack-{cfg.n_text_state}"
        out.mkdir()
        write_decoder_pack(model.decoder, out)
        sizes, arrays = read_decoder_pack(out)
        assert (arrays["blocks.0.fc1.w"].dtype == np.float16) == fp16
        assert arrays["table"].dtype == (np.float16 if fp16 else np.float32)
        dec = CpuWhisperDecoder(lib, sizes, arrays, threads=2)
        rng = np.random.default_rng(0)
        for batch in (1, 3):
            audio = torch.randn(batch, cfg.n_audio_ctx, cfg.n_text_state)
            with torch.no_grad():
                ck, cv = model.decoder.cross_kv(audio)
            sk, sv = model.empty_cache(batch)
            k, v = dec.empty_cache(batch), dec.empty_cache(batch)
            offset = 0
            for t in (3, 1, 1, 5, 1):
                tokens = rng.integers(0, cfg.n_vocab, (batch, t))
                with torch.no_grad():
                    ref, sk, sv = model.decoder(torch.from_numpy(tokens), torch.tensor(offset), ck, cv, sk, sv)
                got = dec.step(tokens, offset, k, v, [a.numpy() for a in ck], [a.numpy() for a in cv])
                offset += t
                assert got.shape == ref.shape
                err = np.abs(got - ref.numpy()).max() / np.abs(ref.numpy()).max()
                assert err < 1e-5, (variant, cfg.n_text_state, batch, t, err)
                # the cache holds the torch decoder's keys and values at the filled positions
                assert np.allclose(k[:, :, :offset], sk.numpy(), atol=1e-5, rtol=1e-5)


def test_c_decoder_refuses_bad_calls(tmp_path):
    lib, isa = compile_library(tmp_path / "lib")
    if lib is None:
        kernel_missing(isa)
    write_decoder_pack(_model(True).decoder, tmp_path)
    dec = CpuWhisperDecoder(lib, *read_decoder_pack(tmp_path), threads=2)
    ck = [np.zeros((1, 4, 16, 10), np.float32)] * 2
    cv = [np.zeros((1, 4, 10, 16), np.float32)] * 2
    k, v = dec.empty_cache(1), dec.empty_cache(1)
    with pytest.raises(ValueError, match="refused"):  # past the context
        dec.step(np.zeros((1, 2), np.int64), CFG.n_text_ctx - 1, k, v, ck, cv)
    with pytest.raises(ValueError, match="refused"):
        dec.step(np.array([[CFG.n_vocab]]), 0, k, v, ck, cv)
    with pytest.raises(ValueError, match="self_k"):
        dec.step(np.zeros((1, 1), np.int64), 0, k[:, :, :5], v, ck, cv)
    with pytest.raises(ValueError, match="cross K"):
        dec.step(np.zeros((1, 1), np.int64), 0, k, v, [np.zeros((1, 4, 10, 16), np.float32)] * 2, cv)


def _graphs(tmp_path: Path, fp16: bool) -> Path:
    """A tiny random Whisper exported as load_asr does, optimized as its cache holds it, with the pack."""
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx
    from edge_mmm.runners.ort_session import save_optimized_onnx

    model = _model(fp16)
    raw, out = tmp_path / "raw", tmp_path / "graphs"
    export_whisper_onnx(model, raw, check=False, ort_fused_attention=True, dynamic_frames=True)
    out.mkdir()
    for name in (ENCODER_FILE, DECODER_FILE):
        save_optimized_onnx(raw / name, out / name, name)
    write_decoder_pack(model.decoder, out)
    return out


def _run(backend, mel, tokens, group=1):
    state = backend.new_state(backend.encode(mel), group)
    logits = [backend.step(state, np.array([tokens[:3]] * group))]
    for t in tokens[3:]:
        logits.append(backend.step(state, np.array([[t]] * group)))
    return state, logits


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16-weights", "fp32-weights"])
def test_backend_on_the_c_decoder_equals_the_decoder_graph(tmp_path, fp16):
    """Steps, a beam reorder (duplicate one hypothesis, drop another) and a truncation (a draft's rejected tail)
    give the decoder graph's logits."""
    graphs = _graphs(tmp_path, fp16)
    c = OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    if c.cpu_decoder is None:
        kernel_missing("OnnxWhisperBackend fell back to the decoder graph")
    graph = OnnxWhisperBackend(graphs, CFG, threads=2, cpu_decoder=False)
    assert graph.cpu_decoder is None and graph.decoder is not None and c.decoder is None
    mel = np.random.default_rng(0).standard_normal((1, 80, 400)).astype(np.float32)
    tokens = [50257, 50362, 12, 400, 51000, 7, 50256]

    def close(a, b):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()

    states = []
    for backend in (c, graph):
        state, logits = _run(backend, mel, tokens, group=3)
        states.append((backend, state, logits))
    for a, b in zip(states[0][2], states[1][2]):
        close(a, b)
    after = []
    for backend, state, _ in states:
        backend.reorder(state, np.array([2, 2, 0]))
        backend.truncate(state, 5)
        assert state.offset == 5
        after.append(backend.step(state, np.array([[9], [10], [11]])))
    close(*after)
    state = c.new_state(c.encode(mel), 1)
    with pytest.raises(InputError, match="token ids"):
        c.step(state, np.array([[CFG.n_vocab]]))
    with pytest.raises(InputError, match="positions"):
        c.step(state, np.zeros((1, CFG.n_text_ctx + 1), np.int64))


def test_kernel_off_uses_the_decoder_graph(tmp_path, monkeypatch):
    graphs = _graphs(tmp_path, True)
    monkeypatch.setenv("EDGE_MMM_CPU_KERNEL", "0")
    backend = OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    assert backend.cpu_decoder is None
    assert "tokens" in {i.name for i in backend.decoder.get_inputs()}


def test_a_bad_pack_is_a_model_file_error(tmp_path):
    graphs = _graphs(tmp_path, True)
    meta_path, data = graphs / DECODER_PACK_JSON, graphs / DECODER_PACK_BIN
    meta = json.loads(meta_path.read_text())

    def refused(match):
        with pytest.raises(ModelFileError, match=match):
            OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")

    full = data.read_bytes()
    data.write_bytes(full[:-2])
    refused("past the end of the file")
    data.write_bytes(full)
    meta_path.write_text("{")
    refused("not JSON")
    meta_path.write_text(json.dumps({**meta, "format": 99}))
    refused("not a Whisper decoder pack")
    meta_path.write_text(json.dumps({**meta, "arrays": {k: v for k, v in meta["arrays"].items() if k != "pos"}}))
    refused("arrays listed")
    meta_path.write_text(json.dumps({**meta, "arrays": {**meta["arrays"], "pos": ["int8", 0]}}))
    refused("array pos: not")
    pos = meta["arrays"]["pos"]
    meta_path.write_text(json.dumps({**meta, "arrays": {**meta["arrays"], "pos": ["|i1", pos[1], pos[2]]}}))
    refused("array pos is")
    meta_path.write_text(json.dumps({**meta, "arrays": {**meta["arrays"], "pos": ["<f4", [3, 3], pos[2]]}}))
    refused("array pos is")
    meta_path.write_text(json.dumps({**meta, "layers": 3}))
    refused("arrays listed")
    # a consistent pack of another model
    other = WhisperConfig(**{**CFG.__dict__, "n_text_ctx": 32})
    write_decoder_pack(Whisper(other).decoder, graphs)
    refused("disagree with the config")


def _small_decoder(tmp_path):
    lib, isa = compile_library(tmp_path / "lib")
    if lib is None:
        kernel_missing(isa)
    model = _model(True)
    write_decoder_pack(model.decoder, tmp_path)
    dec = CpuWhisperDecoder(lib, *read_decoder_pack(tmp_path), threads=2)
    with torch.no_grad():
        ck, cv = model.decoder.cross_kv(torch.randn(1, 30, CFG.n_text_state))
    return dec, [a.numpy() for a in ck], [a.numpy() for a in cv]


def _step(dec, ck, cv, tokens):
    k, v = dec.empty_cache(1), dec.empty_cache(1)
    return dec.step(np.array([tokens]), 0, k, v, ck, cv)


def test_calls_from_several_threads(tmp_path):
    """The kernel's one thread team serves calls from several threads one at a time: same logits as alone."""
    import threading

    dec, ck, cv = _small_decoder(tmp_path)
    ref = _step(dec, ck, cv, [1, 2, 3])
    results = []
    threads = [threading.Thread(target=lambda: results.extend(_step(dec, ck, cv, [1, 2, 3]) for _ in range(5)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(np.array_equal(r, ref) for r in results)


def test_a_forked_child_gets_its_own_team(tmp_path):
    """The team's workers stay in the parent; a child forked after they started runs its calls on its own."""
    import multiprocessing

    global _FORKED
    _FORKED = _small_decoder(tmp_path)  # inherited by the child (a ctypes library does not pickle)
    ref = _step(*_FORKED, [4, 5])
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_step_forked, ([4, 5],)).get(timeout=60)
    assert np.array_equal(got, ref)
    assert np.array_equal(_step(*_FORKED, [4, 5]), ref)


_FORKED = None


def _step_forked(tokens):
    return _step(*_FORKED, tokens)


def test_the_kernel_does_not_load_libgomp(tmp_path):
    """Not OpenMP: libgomp (which torch also ships) counts every host thread's pool, and two pools made both the
    LM and Whisper's decoder 2-2.5x slower (docs/speech.md). A torch-free process that loads the kernel and runs
    a decode step has no libgomp mapped."""
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
from edge_mmm.runners.cpu_lm import compile_library
lib, isa = compile_library(Path({str(tmp_path / 'lib')!r}))
assert lib is not None, isa
assert 'torch' not in sys.modules
maps = Path('/proc/self/maps').read_text()
print('libgomp' in maps)
"""
    lib, isa = compile_library(tmp_path / "lib")
    if lib is None:
        kernel_missing(isa)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
