"""Whisper's output projection in edge-mmm's C kernel (`runners.cpu_lm.CpuHead`) and the decoder trunk graph
it follows (`asr.ort_graphs.write_decoder_trunk`).

Tolerances: each logit of the C projection within 1e-5 * sum|x_i * w_i| of a float64 product of the same
fp32/fp16 values (fp32 sums in another order), on every instruction-set path; trunk + C head within
1e-4 * max|logit| of the one onnxruntime decoder graph they were cut from, through a prompt and decode steps.
tests/asr/test_parity.py checks openai-whisper's greedy and beam-search tokens through the same path on the
shipped tiny.en.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_mmm.asr.backends import OnnxWhisperBackend
from edge_mmm.asr.ort_graphs import DECODER_HEAD, DECODER_TABLE, DECODER_TRUNK, write_decoder_trunk
from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.models.whisper import Whisper, WhisperConfig
from edge_mmm.models.whisper_config import DECODER_FILE, ENCODER_FILE
from edge_mmm.runners.cpu_lm import CpuHead, compile_library

X86 = platform.machine() == "x86_64" and "avx2" in Path("/proc/cpuinfo").read_text()
VARIANTS = {"native": None, **({"avx2": ["-march=haswell"], "generic": ["-march=x86-64"]} if X86 else {})}
def _kernel_missing(why: str) -> None:
    """Fail on x86-64, where the README installs the C compiler the kernel needs; skip elsewhere (no C path)."""
    if platform.machine() in ("x86_64", "AMD64"):
        pytest.fail(f"the C kernel must build on an x86-64 host: {why}")
    pytest.skip(f"the C kernel has no path for {platform.machine()}: {why}")


CFG = WhisperConfig(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=1,
                    n_vocab=51864, n_text_ctx=64, n_text_state=64, n_text_head=4, n_text_layer=2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_head_matches_a_float64_product(variant, tmp_path):
    """Vocabulary sizes that end in a partial chunk and a partial group of eight rows, widths that end in a
    partial vector, 1-9 rows, one thread and (40003 rows: enough chunks) two; fp16 subnormals, the largest fp16
    and -0 convert exactly."""
    lib, isa = compile_library(tmp_path / "lib", VARIANTS[variant])
    if lib is None:
        _kernel_missing(isa)
    assert variant == "native" or isa == variant
    rng = np.random.default_rng(1)
    for vocab, dim in [(1001, 40), (515, 64), (37, 20), (40003, 24)]:
        table = (rng.standard_normal((vocab, dim)) * 0.05).astype(np.float16)
        table[0, :5] = [6e-8, -3e-6, 65504.0, -0.0, 1e-5]
        for rows in (1, 3, 4, 9):
            x = rng.standard_normal((rows, dim)).astype(np.float32)
            ref = x.astype(np.float64) @ table.astype(np.float64).T
            scale = np.abs(x).astype(np.float64) @ np.abs(table.astype(np.float64)).T  # each sum's size
            for tab in (table, table.astype(np.float32)):
                out = CpuHead(lib, tab, threads=2)(x)
                assert out.shape == (rows, vocab) and out.dtype == np.float32
                err = (np.abs(out - ref) / scale).max()
                assert err < 1e-5, (variant, vocab, dim, rows, tab.dtype, err)


def test_head_rejects_bad_shapes(tmp_path):
    lib, isa = compile_library(tmp_path / "lib")
    if lib is None:
        _kernel_missing(isa)
    head = CpuHead(lib, np.zeros((10, 16), np.float16))
    with pytest.raises(ValueError, match=r"\[rows, 16\]"):
        head(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        CpuHead(lib, np.zeros((16, 10), np.float16).T)


def _graphs(tmp_path: Path, fp16_table: bool) -> Path:
    """A tiny random Whisper exported as load_asr does and optimized as its cache holds it, plus the trunk."""
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx
    from edge_mmm.runners.ort_session import save_optimized_onnx

    torch.manual_seed(3)
    model = Whisper(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        if fp16_table:  # a checkpoint stored in fp16 (openai-whisper, CTranslate2)
            emb = model.decoder.token_embedding.weight
            emb.copy_(emb.half().float())
    raw, out = tmp_path / "raw", tmp_path / "graphs"
    export_whisper_onnx(model, raw, check=False, ort_fused_attention=True, dynamic_frames=True)
    out.mkdir()
    for name in (ENCODER_FILE, DECODER_FILE):
        save_optimized_onnx(raw / name, out / name, name)
    assert write_decoder_trunk(out / DECODER_FILE)
    return out


def _run(backend, mel, tokens):
    state = backend.new_state(backend.encode(mel), 1)
    logits = [backend.step(state, np.array([tokens[:3]]))]
    for t in tokens[3:]:
        logits.append(backend.step(state, np.array([[t]])))
    return logits


@pytest.mark.parametrize("fp16_table", [True, False], ids=["fp16-table", "fp32-table"])
def test_trunk_and_c_head_equal_the_decoder_graph(tmp_path, fp16_table):
    """An fp16-exact table is stored in fp16 (half the bytes), any other in fp32; either way the logits are the
    decoder graph's."""
    graphs = _graphs(tmp_path, fp16_table)
    meta = json.loads((graphs / DECODER_HEAD).read_text())
    assert meta["dtype"] == ("float16" if fp16_table else "float32")
    assert (graphs / DECODER_TABLE).stat().st_size == CFG.n_vocab * CFG.n_text_state * (2 if fp16_table else 4)
    head = OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    if head.head is None:
        _kernel_missing("OnnxWhisperBackend fell back to the decoder graph")
    graph = OnnxWhisperBackend(graphs, CFG, threads=2, cpu_head=False)
    assert graph.head is None
    mel = np.random.default_rng(0).standard_normal((1, 80, 400)).astype(np.float32)
    tokens = [50257, 50362, 12, 400, 51000, 7, 50256]
    for a, b in zip(_run(head, mel, tokens), _run(graph, mel, tokens)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    state = head.new_state(head.encode(mel), 1)
    with pytest.raises(InputError, match="token ids"):
        head.step(state, np.array([[CFG.n_vocab]]))


def test_kernel_off_uses_the_decoder_graph(tmp_path, monkeypatch):
    graphs = _graphs(tmp_path, True)
    monkeypatch.setenv("EDGE_MMM_CPU_KERNEL", "0")
    backend = OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    assert backend.head is None
    assert "tokens" in {i.name for i in backend.decoder.get_inputs()}


def test_a_bad_table_is_a_model_file_error(tmp_path):
    graphs = _graphs(tmp_path, True)
    table = graphs / DECODER_TABLE
    table.write_bytes(table.read_bytes()[:-2])
    with pytest.raises(ModelFileError, match="values, expected"):
        OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    (graphs / DECODER_HEAD).write_text(json.dumps({"format": 99}))
    with pytest.raises(ModelFileError, match="not a decoder head"):
        OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    (graphs / DECODER_HEAD).write_text(json.dumps({"format": 1, "dtype": "float16", "vocab": 1000, "dim": 64}))
    table.write_bytes(np.zeros((1000, 64), np.float16).tobytes())
    with pytest.raises(ModelFileError, match="the config says"):
        OnnxWhisperBackend(graphs, CFG, threads=2, cache_dir=tmp_path / "kernel")
    assert (graphs / DECODER_TRUNK).is_file()
