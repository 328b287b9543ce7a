"""The VLM's LM on onnxruntime (`load_vlm(..., lm_backend="onnxruntime")`, edge_mmm/vision/lm_onnx.py) on a
tiny random checkpoint: the same logits as the torch LM (within 1e-4 x max|logit|, fp32 activations; int4
weights through MatMulNBits), greedy tokens equal to transformers' for the float model, and the KV prefix
reuse of the live runtime (prefill ahead, reuse, a grown cache) giving the answers of a fresh model."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from tiny_idefics3 import build_tiny_vlm  # noqa: E402

from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.text.generation import GenerationConfig  # noqa: E402
from edge_mmm.vision.api import VLM_LM_KIND, load_vlm  # noqa: E402
from edge_mmm.vision.lm_onnx import OrtVLMBackend  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_vlm_lm_onnx")
    hf, proc = build_tiny_vlm(d, seed=5)
    return hf, proc, d


def _msgs(img, q):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_onnxruntime_lm_logits_match_torch(tiny, tmp_path, quantize):
    _, _, d = tiny
    load_vlm(d, quantize=quantize, lm_backend="onnxruntime", onnx_cache_dir=tmp_path)  # builds the export
    # a load from the cache, which skips quantizing the torch LM (the export holds the quantized weights)
    ort_vlm = load_vlm(d, quantize=quantize, lm_backend="onnxruntime", onnx_cache_dir=tmp_path)
    torch_vlm = load_vlm(d, quantize=quantize)
    assert isinstance(ort_vlm.backend, OrtVLMBackend)
    prepared = torch_vlm.prepare(_msgs(Image.fromarray(skdata.astronaut()), "What is this?"))
    assert sum(prepared.image_tokens) > 0
    steps = []
    for vlm in (torch_vlm, ort_vlm):
        backend = vlm.backend.for_prompt(prepared.features)
        cache = backend.new_cache(len(prepared.ids) + 8)
        rows = [np.asarray(backend.prefill(prepared.ids, cache), np.float32)]
        tok = int(rows[0].argmax())
        for _ in range(4):
            rows.append(np.asarray(backend.decode(tok, cache), np.float32))
            tok = int(rows[-1].argmax())
        steps.append(np.stack(rows))
    ref, got = steps
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()
    assert len(list((tmp_path / VLM_LM_KIND).iterdir())) == 1  # exported once into the cache


def test_onnxruntime_lm_greedy_matches_transformers(tiny, tmp_path):
    hf, proc, d = tiny
    img = Image.fromarray(skdata.coffee())
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "Describe it."}]}],
                                    add_generation_prompt=True)
    inputs = proc(images=[img], text=text, return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = hf.generation_config.eos_token_id
    ref = ref[: ref.index(eos)] if eos in ref else ref
    vlm = load_vlm(d, lm_backend="onnxruntime", onnx_cache_dir=tmp_path)
    gen = vlm.generate(_msgs(img, "Describe it."), GenerationConfig(max_tokens=16))
    assert gen.token_ids == ref and len(ref) > 3
    # the torch weights onnxruntime replaced are freed (meta device); the token table the LM is fed stays
    assert {p.device.type for p in vlm.model.lm.layers.parameters()} | {
        b.device.type for b in vlm.model.lm.layers.buffers()} == {"meta"}
    assert vlm.model.lm.embed_tokens.weight.device.type == "cpu"
    both = load_vlm(d, backend="onnxruntime", lm_backend="onnxruntime", onnx_cache_dir=tmp_path)
    assert {p.device.type for p in both.model.vision.parameters()} == {"meta"}
    assert both.generate(_msgs(img, "Describe it."), GenerationConfig(max_tokens=16)).token_ids == ref
    torch_vlm = load_vlm(d)  # torch everywhere: nothing is freed
    assert {p.device.type for p in torch_vlm.model.parameters()} == {"cpu"}


def test_onnxruntime_lm_prefix_reuse_and_growth_are_exact(tiny, tmp_path):
    """Prefilled ahead (the live runtime), reused by the next question, a cache grown for a longer answer
    (its prefix copied): every answer equals a fresh model's; another image voids the image positions."""
    _, _, d = tiny
    cat, cup = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())

    def fresh(msgs, n):
        return load_vlm(d, lm_backend="onnxruntime", onnx_cache_dir=tmp_path).generate(
            msgs, GenerationConfig(max_tokens=n)).token_ids

    vlm = load_vlm(d, lm_backend="onnxruntime", onnx_cache_dir=tmp_path)
    prefix = vlm.prepare(_msgs(cat, "a"))
    n = next(i for i, (x, y) in enumerate(zip(prefix.ids, vlm.prepare(_msgs(cat, "b")).ids)) if x != y)
    assert vlm.prefill_prefix(prefix, n, room=2) == 0
    first = vlm.generate(_msgs(cat, "What is it?"), GenerationConfig(max_tokens=2))
    assert first.timings["prompt_reused"] == n and first.token_ids == fresh(_msgs(cat, "What is it?"), 2)
    small = vlm._kv.max_len
    second = vlm.generate(_msgs(cat, "What color is it?"), GenerationConfig(max_tokens=12))
    assert vlm._kv.max_len > small  # grown, the image prefix copied over
    assert second.timings["prompt_reused"] >= n
    assert second.token_ids == fresh(_msgs(cat, "What color is it?"), 12)
    third = vlm.generate(_msgs(cup, "What color is it?"), GenerationConfig(max_tokens=6))
    assert third.timings["prompt_reused"] <= vlm.prepare(_msgs(cup, "x")).ids.index(vlm.model.config.image_token_id)
    assert third.token_ids == fresh(_msgs(cup, "What color is it?"), 6)


def test_onnxruntime_lm_refuses_bad_settings(tiny, tmp_path):
    import torch

    _, _, d = tiny
    with pytest.raises(InputError, match="VLM LM backend"):
        load_vlm(d, lm_backend="tensorrt")
    with pytest.raises(InputError, match="float32"):
        load_vlm(d, lm_backend="onnxruntime", dtype=torch.bfloat16, onnx_cache_dir=tmp_path)
    vlm = load_vlm(d, lm_backend="onnxruntime", onnx_cache_dir=tmp_path)
    ids = vlm.prepare(_msgs(Image.fromarray(skdata.chelsea()), "x")).ids
    with pytest.raises(InputError, match="no image"):
        vlm.backend.prefill(ids, vlm.backend.new_cache(len(ids) + 1))
