"""load_vlm end to end on a tiny random checkpoint: greedy generation equals transformers' generate token
for token; the image-embedding cache skips the encoder on a second question; message formats."""

import base64
import io

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from tiny_idefics3 import build_tiny_vlm  # noqa: E402

from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.text.generation import GenerationConfig  # noqa: E402
from edge_mmm.vision.api import load_vlm  # noqa: E402

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_vlm_api")
    hf, proc = build_tiny_vlm(d, seed=3)
    return hf, proc, d


def _hf_greedy(hf, proc, image, question):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=[image], text=text, return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = hf.generation_config.eos_token_id
    return new[: new.index(eos)] if eos in new else new, inputs["input_ids"].shape[1]


@pytest.mark.parametrize("photo", ["coffee", "rocket"])
def test_greedy_generation_matches_transformers(tiny, photo):
    hf, proc, d = tiny
    img = Image.fromarray(getattr(skdata, photo)())
    ref, n_prompt = _hf_greedy(hf, proc, img, "Describe it.")
    vlm = load_vlm(d)  # vision_precision auto: on the torch backend, the eager fp32 module
    assert vlm.encoder.name == "torch" and vlm.vision_precision == "fp32"
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe it."}]}]
    gen = vlm.generate(msgs, GenerationConfig(max_tokens=MAX_NEW))
    assert gen.prompt_tokens == n_prompt
    assert gen.token_ids == ref
    assert len(ref) > 3  # a non-trivial continuation was compared


def test_cache_skips_encoder_on_second_question(tiny, tmp_path):
    _, _, d = tiny
    vlm = load_vlm(d)
    path = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(path)
    cfg = GenerationConfig(max_tokens=4)

    def ask(q, url):
        return vlm.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": q}]}], cfg)

    first = ask("What is it?", str(path))
    assert vlm.encoder.calls == 1 and first.timings["image_cache_hit"] == 0.0
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    second = ask("What color is it?", data_url)  # same pixels through another door
    assert vlm.encoder.calls == 1 and second.timings["image_cache_hit"] == 1.0
    for key in ("vision_s", "prefill_s", "ttft_s", "decode_tok_s"):
        assert key in second.timings
    ask("And now?", str(path.with_name("cat.png")))
    assert vlm.encoder.calls == 1
    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buf, format="PNG")
    ask("Other?", "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    assert vlm.encoder.calls == 2


def test_bad_messages(tiny):
    _, _, d = tiny
    vlm = load_vlm(d)
    with pytest.raises(InputError):
        vlm.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    with pytest.raises(InputError):
        vlm.generate([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(InputError):
        vlm.generate([])
    text_only = vlm.generate([{"role": "user", "content": "hello"}], GenerationConfig(max_tokens=2))
    assert text_only.prompt_tokens > 0


def test_kv_prefix_reuse_is_exact(tiny):
    """A second question about the same image reuses the image's KV positions; answers equal a fresh model's.
    A different image must not reuse its predecessor's image positions."""
    _, _, d = tiny
    cat, cup = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())
    cfg = GenerationConfig(max_tokens=6)

    def msgs(img, q):
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]

    vlm = load_vlm(d)
    vlm.generate(msgs(cat, "What animal?"), cfg)
    second = vlm.generate(msgs(cat, "What color?"), cfg)
    n_image_tokens = sum(vlm.prepare(msgs(cat, "x")).image_tokens)
    assert second.timings["prompt_reused"] > n_image_tokens
    assert second.token_ids == load_vlm(d).generate(msgs(cat, "What color?"), cfg).token_ids
    third = vlm.generate(msgs(cup, "What color?"), cfg)
    first_image_pos = vlm.prepare(msgs(cup, "x")).ids.index(vlm.model.config.image_token_id)
    assert third.timings["prompt_reused"] <= first_image_pos
    assert third.token_ids == load_vlm(d).generate(msgs(cup, "What color?"), cfg).token_ids


def test_prefill_prefix_with_image_tokens_gives_same_tokens(tiny):
    """The image tokens prefilled ahead of the question (the live runtime, while the user speaks) are reused
    and the answer is the one without it; another image voids the prefilled image tokens."""
    _, _, d = tiny
    cfg = GenerationConfig(max_tokens=6)
    cat, coffee = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())

    def msgs(img, q):
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]

    ref = load_vlm(d).generate(msgs(cat, "What is it?"), cfg)
    vlm = load_vlm(d)
    prefix = vlm.prepare(msgs(cat, "a"))
    n = next(i for i, (x, y) in enumerate(zip(prefix.ids, vlm.prepare(msgs(cat, "b")).ids)) if x != y)
    assert sum(t == vlm.model.config.image_token_id for t in prefix.ids[:n]) == prefix.image_tokens[0]
    assert vlm.prefill_prefix(prefix, n) == 0
    ahead = vlm.generate(msgs(cat, "What is it?"), cfg)
    assert ahead.timings["prompt_reused"] == n and ahead.token_ids == ref.token_ids
    vlm.prefill_prefix(vlm.prepare(msgs(coffee, "a")), n)  # the scene changed: other image tokens
    again = vlm.generate(msgs(cat, "What is it?"), cfg)
    assert again.token_ids == ref.token_ids and again.timings["prompt_reused"] < n


def test_loading_a_vlm_does_not_import_torch_dynamo(tiny, tmp_path):
    """Building the vision tower on the meta device used to run `normal_` on a meta tensor, which imports
    torch._dynamo: ~0.8 s of every cold `ask`/`run` with a VLM whose exports are cached."""
    import subprocess
    import sys

    _, _, d = tiny
    load = ("import sys; from edge_mmm.vision.api import load_vlm; "
            f"load_vlm({str(d)!r}, backend='onnxruntime', onnx_cache_dir={str(tmp_path)!r}); ")
    first = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]  # exports the graphs (torch.export imports dynamo)
    code = load + "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'"
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]  # a load from the cache builds on meta only
