"""Build a tiny random SmolVLM-style checkpoint with transformers (model, tokenizer, processor) for tests.

Shared by tests/models/test_idefics3.py, tests/vision/* and tests/exporters/test_onnx_vision.py.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
            "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
CORPUS = [
    "User: What is in this image? Assistant: A cat sitting on a sofa, a cup of coffee, a rocket.",
    "Describe the picture in one sentence. The astronaut smiles; the galaxy field is deep and dark.",
    "0123456789 !?.,:;'\"()[]{}<>-_=+*/\\|@#$%^&~` \n\n\t abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer():
    """A small byte-level BPE tokenizer with the Idefics3 special tokens, as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL[:1],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    fast.add_tokens([s for s in SPECIAL[1:3]], special_tokens=True)
    return fast


def build_tiny_vlm(out: Path, seed: int = 0, longest_edge: int = 256, tile: int = 64, splitting: bool = True,
                   tie: bool = False, arch: str = "idefics3", real_dims: bool = False):
    """Save a tiny random Idefics3ForConditionalGeneration (or SmolVLM2's SmolVLMForConditionalGeneration,
    `arch="smolvlm"`) + an Idefics3 processor to `out`; returns (model, processor). `real_dims` uses
    SmolVLM-256M-Instruct's vision/text dimensions (random weights, the tiny tokenizer's vocabulary)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    if arch == "smolvlm":
        from transformers import SmolVLMConfig as Idefics3Config  # noqa: F811  same fields, same layout
        from transformers import SmolVLMForConditionalGeneration as Idefics3ForConditionalGeneration  # noqa: F811
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_tokenizer()
    image_size, patch, scale = tile, 8, 2
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0)
    if real_dims:
        image_size, patch, scale, tile, longest_edge = 512, 16, 4, 512, 2048
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=100000.0)
    cfg = Idefics3Config(
        vision_config=dict(**vision, image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", **text, vocab_size=len(tokenizer),
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        scale_factor=scale, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init is tiny-std; widen it so logits actually depend on the image
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2 if "embed" in name or "position" in name else 0.02 if real_dims else 0.08)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_seq_len = (image_size // patch) ** 2 // scale ** 2
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                                do_image_splitting=splitting)
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len,
                                  chat_template=CHAT_TEMPLATE)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor
