"""Our Llama vs transformers on tiny random Llama/Qwen2 checkpoints; KV cache semantics; GGUF round trip."""


import pytest
import torch

pytest.importorskip("transformers")

from tiny_llama import tiny_hf_model, write_gguf  # noqa: E402

from edge_mmm.models.llama import KVCache, build_llama  # noqa: E402
from edge_mmm.weights.gguf_lm import load_gguf_lm  # noqa: E402
from edge_mmm.weights.hf_lm import load_hf_lm  # noqa: E402

ATOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 50000.0}
VARIANTS = {
    "llama": dict(kind="llama"),
    "llama3-rope-bias-tied": dict(kind="llama", rope_parameters=LLAMA3_ROPE, attention_bias=True,
                                  mlp_bias=True, tie_word_embeddings=True),
    "qwen2": dict(kind="qwen2"),
    "qwen2-tied": dict(kind="qwen2", tie_word_embeddings=True),
}


def _ids(n=23, vocab=256, seed=1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    kw = dict(VARIANTS[request.param])
    hf = tiny_hf_model(kw.pop("kind"), **kw)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, d


def test_logits_match_transformers(saved):
    hf, d = saved
    cfg, state = load_hf_lm(d)
    ours = build_llama(cfg, state)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < ATOL


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg, state = load_hf_lm(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert (build_llama(cfg, state)(ids) - hf(ids).logits).abs().max() < ATOL


def test_cached_prefill_and_decode_equal_full_forward(saved):
    hf, d = saved
    cfg, state = load_hf_lm(d)
    model = build_llama(cfg, state)
    ids = _ids(20)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_config(cfg, 32)
        parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]  # prefill, then a chunk
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(12, 20)]  # one-token decode
        assert cache.length == 20
        assert (torch.cat(parts, 1) - full).abs().max() < ATOL
        # reuse a prefix: truncate to 12 and recompute the tail with different tokens, then the originals
        cache.truncate(12)
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        cache.truncate(12)
        again = model(ids[:, 12:], cache=cache)
        assert (again - full[:, 12:]).abs().max() < ATOL
        last = model(ids, cache=KVCache.for_config(cfg, 32), last_only=True)
        assert last.shape[1] == 1 and (last[:, 0] - full[:, -1]).abs().max() < ATOL


def test_inputs_embeds_path(saved):
    hf, d = saved
    cfg, state = load_hf_lm(d)
    model = build_llama(cfg, state)
    ids = _ids(9)
    with torch.no_grad():
        a = model(ids)
        b = model(inputs_embeds=model.embed_tokens(ids))
    assert torch.equal(a, b)


def test_cache_bounds():
    from edge_mmm.errors import InputError

    cache = KVCache(1, 1, 1, 4, 2)
    with pytest.raises(InputError):
        cache.update(0, 3, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError):
        cache.truncate(1)  # length is 0


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_transformers(tmp_path, qtype, arch):
    """A GGUF written as llama.cpp's converter does (Q/K rows permuted for llama) gives transformers' logits."""
    import transformers

    hf = tiny_hf_model(arch, tie_word_embeddings=arch == "qwen2")
    ref_state = write_gguf(tmp_path / "m.gguf", hf, qtype=qtype, arch=arch)
    hf.load_state_dict(ref_state, strict=False)
    cfg, state, _ = load_gguf_lm(tmp_path / "m.gguf")
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        from edge_mmm.quant.linear import QuantLinear

        assert isinstance(state["layers.0.self_attn.q_proj"], QuantLinear)
    ours = build_llama(cfg, state)
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < ATOL
    assert isinstance(hf, transformers.PreTrainedModel)
