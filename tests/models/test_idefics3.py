"""Our loader + Idefics3 VLM vs transformers' Idefics3ForConditionalGeneration on a tiny random checkpoint.

Same input_ids / pixel_values / pixel_attention_mask from the transformers processor; logits within 1e-4
(fp32) for several aspect ratios, with and without image splitting, and with two images per prompt.
"""


import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from tiny_idefics3 import build_tiny_vlm  # noqa: E402

from edge_mmm.errors import ModelFileError  # noqa: E402
from edge_mmm.vision.idefics3 import load_idefics3  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module", params=[True, False], ids=["split", "nosplit"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_vlm")
    hf, proc = build_tiny_vlm(d, splitting=request.param)
    ours, files = load_idefics3(d)
    return hf, proc, ours, files, d


def _crop(arr, aspect):
    h, w = arr.shape[:2]
    if aspect >= 1:
        return arr[: max(8, int(w / aspect))] if int(w / aspect) <= h else arr
    return arr[:, : max(8, int(h * aspect))]


@pytest.mark.parametrize("photo,aspect", [("astronaut", 1.0), ("coffee", 1.5), ("rocket", 0.5),
                                          ("chelsea", 3.0), ("hubble_deep_field", 1.15)])
def test_logits_match_transformers(tiny, photo, aspect):
    from PIL import Image

    hf, proc, ours, _, _ = tiny
    img = Image.fromarray(_crop(getattr(skdata, photo)(), aspect))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=[img], text=text, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = ours(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err < ATOL, err


def test_two_images_and_text_only(tiny):
    from PIL import Image

    hf, proc, ours, _, _ = tiny
    text = "<|im_start|>User:<image>vs<image>which?<end_of_utterance>\nAssistant:"
    inputs = proc(images=[Image.fromarray(skdata.coffee()), Image.fromarray(skdata.camera())], text=text,
                  return_tensors="pt")
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = ours(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        assert (got - ref).abs().max().item() < ATOL
        ids = proc(text="<|im_start|>User: hi<end_of_utterance>\nAssistant:", return_tensors="pt")["input_ids"]
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() < ATOL


def test_image_changes_logits(tiny):
    """Guards against a vacuous match: a different image gives different logits."""
    from PIL import Image

    _, proc, ours, _, _ = tiny
    text = "<|im_start|>User:<image>x<end_of_utterance>\nAssistant:"
    a = proc(images=[Image.fromarray(skdata.astronaut())], text=text, return_tensors="pt")
    b = proc(images=[Image.fromarray(skdata.chelsea()[:300, :300])], text=text, return_tensors="pt")
    with torch.no_grad():
        la = ours(a["input_ids"], a["pixel_values"], a["pixel_attention_mask"])[0, -1]
        lb = ours(b["input_ids"], b["pixel_values"], b["pixel_attention_mask"])[0, -1]
    assert (la - lb).abs().max() > 1e-3


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json", "processor_config.json"])
def test_missing_file_is_named(tiny, tmp_path, missing):
    import shutil

    _, _, _, _, src = tiny
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    (dst / missing).unlink()
    with pytest.raises(ModelFileError, match=missing.split(".")[0] if missing != "processor_config.json"
                       else "preprocessor_config"):
        load_idefics3(dst)


def test_quantized_lm_stays_close(tiny):
    from PIL import Image

    _, proc, ours, _, d = tiny
    from edge_mmm.quant.linear import QuantLinear

    q, _ = load_idefics3(d, quantize="int8")
    assert isinstance(q.lm.layers[0].self_attn.q_proj, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in q.vision.modules())  # vision stays float
    text = "<|im_start|>User:<image>x<end_of_utterance>\nAssistant:"
    x = proc(images=[Image.fromarray(skdata.coffee())], text=text, return_tensors="pt")
    with torch.no_grad():
        a = ours(x["input_ids"], x["pixel_values"], x["pixel_attention_mask"])[0]
        b = q(x["input_ids"], x["pixel_values"], x["pixel_attention_mask"])[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert np.isfinite(b.numpy()).all()


def test_smolvlm2_architecture_loads_and_matches(tmp_path):
    """SmolVLM2 (model_type smolvlm) has the Idefics3 layout: same loader, same logits."""
    from PIL import Image

    hf, proc = build_tiny_vlm(tmp_path, seed=11, arch="smolvlm")
    assert type(hf).__name__ == "SmolVLMForConditionalGeneration"
    ours, _ = load_idefics3(tmp_path)
    text = "<|im_start|>User:<image>what?<end_of_utterance>\nAssistant:"
    x = proc(images=[Image.fromarray(skdata.rocket())], text=text, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**x).logits
        got = ours(x["input_ids"], x["pixel_values"], x["pixel_attention_mask"])
    assert (got - ref).abs().max().item() < ATOL


def test_tied_head_checkpoint(tmp_path):
    from PIL import Image

    hf, proc = build_tiny_vlm(tmp_path, seed=2, tie=True)
    ours, files = load_idefics3(tmp_path)
    assert files.config.text.tie_word_embeddings
    text = "<|im_start|>User:<image>x<end_of_utterance>\nAssistant:"
    x = proc(images=[Image.fromarray(skdata.coffee())], text=text, return_tensors="pt")
    with torch.no_grad():
        assert (ours(x["input_ids"], x["pixel_values"], x["pixel_attention_mask"]) - hf(**x).logits).abs().max() < ATOL


@pytest.mark.slow
def test_smolvlm_256m_dimensions_match_transformers(tmp_path):
    """SmolVLM-256M-Instruct's real dimensions (random weights): 512 px tiles, 32x32 patch grid, scale 4,
    30-layer GQA 9/3 LM. One split photo (13 tiles), logits within 1e-4."""
    from PIL import Image

    hf, proc = build_tiny_vlm(tmp_path, seed=0, real_dims=True)
    ours, files = load_idefics3(tmp_path)
    assert files.config.image_seq_len == 64 and files.image_processor.max_image_size == 512
    text = "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    x = proc(images=[Image.fromarray(skdata.coffee())], text=text, return_tensors="pt")
    assert x["pixel_values"].shape[1] == 13
    with torch.no_grad():
        ref = hf(**x).logits
        got = ours(x["input_ids"], x["pixel_values"], x["pixel_attention_mask"])
    err = (got - ref).abs().max().item()
    print(f"SmolVLM-256M dims: max abs logit error {err:.3g}")
    assert err < ATOL
