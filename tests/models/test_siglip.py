"""SigLIP tower + pixel-shuffle connector vs transformers' Idefics3VisionTransformer / Idefics3Connector.

Tolerance: fp32, max abs error < 1e-4 (observed ~1e-6).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edge_mmm.models.idefics3 import Idefics3Config, Idefics3Connector, Idefics3Vision  # noqa: E402
from edge_mmm.models.llama import LlamaConfig  # noqa: E402
from edge_mmm.models.siglip import SiglipVisionConfig, SiglipVisionTransformer  # noqa: E402

ATOL = 1e-4


def _hf_vision(seed=0):
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    cfg = Idefics3VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=8)
    torch.manual_seed(seed)
    m = Idefics3VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return cfg, m


def _ours(hf_cfg, hf_model):
    cfg = SiglipVisionConfig.from_dict(hf_cfg.to_dict())
    ours = SiglipVisionTransformer(cfg).eval()
    ours.load_state_dict(hf_model.state_dict())
    return ours


@pytest.mark.parametrize("hw", [(64, 64), (64, 40), (24, 64), (8, 8)])
def test_vision_transformer_matches_transformers_with_patch_mask(hw):
    hf_cfg, hf = _hf_vision()
    ours = _ours(hf_cfg, hf)
    torch.manual_seed(1)
    pv = torch.randn(3, 3, 64, 64)
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[0] = True  # a full tile beside partial ones: variable-resolution position ids
    mask[1, : hw[0] // 8, : hw[1] // 8] = True
    mask[2, : hw[1] // 8, : hw[0] // 8] = True
    with torch.no_grad():
        ref = hf(pixel_values=pv, patch_attention_mask=mask).last_hidden_state
        out = ours(pv, mask)
        pos_ref = hf.embeddings(pv, mask) - hf.embeddings.patch_embedding(pv).flatten(2).transpose(1, 2)
        pos_ours = ours.embeddings(pv, mask) - ours.embeddings.patch_embedding(pv).flatten(2).transpose(1, 2)
    assert torch.equal(pos_ref, pos_ours)  # identical position ids
    real = mask.reshape(3, -1)
    assert (out - ref)[real].abs().max() < ATOL


def test_connector_pixel_shuffle_matches_transformers():
    from transformers import Idefics3Config as HFConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as HFConnector

    hf_cfg = HFConfig(vision_config=dict(hidden_size=48), text_config=dict(model_type="llama", hidden_size=40, num_attention_heads=4,
                                                                     num_key_value_heads=4),
                      scale_factor=4)
    torch.manual_seed(0)
    hf = HFConnector(hf_cfg).eval()
    ours = Idefics3Connector(48, 40, 4)
    ours.proj.weight.data.copy_(hf.modality_projection.proj.weight)
    x = torch.randn(2, 64, 48)
    with torch.no_grad():
        assert (ours(x) - hf(x)).abs().max() < ATOL


def test_vision_part_shapes():
    cfg = Idefics3Config(vision=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=64, patch_size=8),
                         text=LlamaConfig(vocab_size=10, hidden_size=24, intermediate_size=48, num_layers=1,
                                          num_heads=4, num_kv_heads=2), scale_factor=2)
    vision = Idefics3Vision(cfg).eval()
    with torch.no_grad():
        feats = vision.encode(torch.randn(1, 3, 3, 64, 64), torch.ones(1, 3, 64, 64, dtype=torch.long))
    assert cfg.image_seq_len == 16
    assert feats.shape == (3 * 16, 24)
