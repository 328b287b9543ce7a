"""LM tokenizer: a `tokenizers.Tokenizer` from `tokenizer.json`, or rebuilt from GGUF metadata.

Special tokens are added tokens, so they are recognized inside text (llama.cpp's `parse_special=True`,
transformers' default). Chat prompts are encoded without BOS/EOS insertion: the template writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from edge_mmm.errors import ModelFileError

# llama.cpp pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
    **{name: [r"\p{N}", _GPT2_SPLIT]
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}
# GGUF token types (llama.cpp LLAMA_TOKEN_TYPE_*)
_CONTROL, _USER_DEFINED = 3, 4
SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "pad")
SAVED_FIELDS = "edge_mmm_tokenizer.json"  # beside tokenizer.json in a saved tokenizer (TextTokenizer.save)


@dataclass
class TextTokenizer:
    """Encode/decode text; `special_tokens` maps bos/eos/unk/pad to their strings (chat template vars)."""

    tokenizer: Any  # tokenizers.Tokenizer
    special_tokens: Dict[str, str] = field(default_factory=dict)
    stop_token_ids: List[int] = field(default_factory=list)
    chat_template: Optional[str] = None
    _specials: Optional[List[str]] = field(default=None, init=False, repr=False)
    _plain: Any = field(default=None, init=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def special_strings(self) -> List[str]:
        """The text of every special (control) token, e.g. '<|im_start|>'."""
        if self._specials is None:
            self._specials = sorted({t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                                     if t.special and t.content})
        return self._specials

    def encode_plain(self, text: str) -> List[int]:
        """Encode untrusted text: a special token's text inside it is split like ordinary text, never
        turned into the control token (a copy of the tokenizer with `encode_special_tokens`)."""
        if self._plain is None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(self.tokenizer.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    # ------------------------------------------------------------------ saved form
    def save(self, path) -> None:
        """Write `tokenizer.json` (the tokenizers library's own format, exact round trip) and SAVED_FIELDS
        (special tokens, stop ids, chat template) into directory `path`; `load_saved` reads them back."""
        path = Path(path)
        self.tokenizer.save(str(path / "tokenizer.json"))
        (path / SAVED_FIELDS).write_text(json.dumps({
            "special_tokens": self.special_tokens, "stop_token_ids": list(self.stop_token_ids),
            "chat_template": self.chat_template}), encoding="utf-8")

    @classmethod
    def load_saved(cls, path) -> "TextTokenizer":
        """A tokenizer written by `save` (milliseconds, where rebuilding one from GGUF metadata takes seconds)."""
        from tokenizers import Tokenizer

        path = Path(path)
        fields = _read_json(path / SAVED_FIELDS)
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            special = {str(k): str(v) for k, v in fields["special_tokens"].items()}
            stops = [int(i) for i in fields["stop_token_ids"]]
            template = fields["chat_template"]
        except Exception as exc:
            raise ModelFileError(f"{path} does not hold a saved tokenizer: {exc}") from exc
        return cls(tok, special, stops, template if isinstance(template, str) else None)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dir(cls, path) -> "TextTokenizer":
        """From a Hugging Face model directory: tokenizer.json (+ tokenizer_config.json, chat template)."""
        from tokenizers import Tokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelFileError(f"{path} has no tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as exc:
            raise ModelFileError(f"{tj} is not a valid tokenizer file: {exc}") from exc
        tcfg = _read_json(path / "tokenizer_config.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = tcfg.get(f"{name}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        else:
            template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        stops: List[int] = []
        for src in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
            eos = src.get("eos_token_id")
            stops += eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
        if "eos" in special and tok.token_to_id(special["eos"]) is not None:
            stops.append(tok.token_to_id(special["eos"]))
        return cls(tok, special, sorted(set(stops)), template)

    @classmethod
    def from_gguf_metadata(cls, meta: Dict[str, Any]) -> "TextTokenizer":
        """Rebuild a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata, as llama.cpp tokenizes."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelFileError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_SPLITS:
            raise ModelFileError(f"GGUF pre-tokenizer {pre!r} is not supported "
                                 f"(supported: {', '.join(sorted(_PRE_SPLITS))})")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ModelFileError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab: Dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES)
        tok = Tokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                        for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            idx = meta.get(f"tokenizer.ggml.{'unknown' if name == 'unk' else 'padding' if name == 'pad' else name}"
                           f"_token_id")
            if isinstance(idx, int) and 0 <= idx < len(tokens):
                special[name] = tokens[idx]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and "bos" in special
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in special
        if add_bos or add_eos:
            single = " ".join((["$bos"] if add_bos else []) + ["$A"] + (["$eos"] if add_eos else []))
            single = single.replace("$bos", special.get("bos", "")).replace("$eos", special.get("eos", ""))
            used = [special[n] for n, on in (("bos", add_bos), ("eos", add_eos)) if on]
            tok.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(t, vocab[t]) for t in used])
        stops = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)]
        return cls(tok, special, sorted(set(stops)), meta.get("tokenizer.chat_template"))


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta, self.text = text[len(self.text):], text
        return delta


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from exc
