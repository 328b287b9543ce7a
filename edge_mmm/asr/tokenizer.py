"""Whisper's tokenizer: a byte-level BPE from `tokenizer.json` plus the special-token layout of the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from edge_mmm.errors import InputError, ModelFileError

# Language codes in Whisper's token order (openai-whisper tokenizer.LANGUAGES).
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt "
    "la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc "
    "ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()


@dataclass
class WhisperTokenizer:
    tokenizer: "object"  # tokenizers.Tokenizer
    n_vocab: int
    multilingual: bool
    num_languages: int
    special: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path, n_vocab: int, multilingual: bool, num_languages: int) -> "WhisperTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFileError(f"{path}: cannot read tokenizer ({exc})") from exc
        # Whisper's vocabulary ends with: <|endoftext|> <|startoftranscript|> <|lang|>*N <|translate|>
        # <|transcribe|> <|startoflm|> <|startofprev|> <|nospeech|> <|notimestamps|> and 1501 timestamps.
        eot = n_vocab - 1501 - 1 - (num_languages + 7)
        file_eot = tok.token_to_id("<|endoftext|>")
        if file_eot != eot:
            raise ModelFileError(f"{path}: <|endoftext|> has id {file_eot}, but a Whisper vocabulary of {n_vocab} "
                                 f"puts it at {eot}: the tokenizer does not belong to these weights")
        names = ["<|startoftranscript|>"] + [f"<|{c}|>" for c in LANGUAGES[:num_languages]] + [
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
        special = {name: eot + 1 + i for i, name in enumerate(names)}
        special["<|endoftext|>"] = eot
        return cls(tok, n_vocab, multilingual, num_languages, special)

    # ---- special ids
    @property
    def eot(self) -> int:
        return self.special["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self.special["<|startoftranscript|>"]

    @property
    def transcribe(self) -> int:
        return self.special["<|transcribe|>"]

    @property
    def translate(self) -> int:
        return self.special["<|translate|>"]

    @property
    def sot_prev(self) -> int:
        return self.special["<|startofprev|>"]

    @property
    def sot_lm(self) -> int:
        return self.special["<|startoflm|>"]

    @property
    def no_speech(self) -> int:
        return self.special["<|nospeech|>"]

    @property
    def no_timestamps(self) -> int:
        return self.special["<|notimestamps|>"]

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @cached_property
    def language_ids(self) -> Dict[str, int]:
        return {c: self.special[f"<|{c}|>"] for c in LANGUAGES[: self.num_languages]}

    def language_token(self, language: str) -> int:
        if language not in self.language_ids:
            raise InputError(f"language '{language}' is not supported by this model "
                             f"(known: {', '.join(sorted(self.language_ids))})")
        return self.language_ids[language]

    def sot_sequence(self, language: Optional[str], task: str) -> Tuple[int, ...]:
        """The decoder prompt: <|sot|> [<|lang|> <|task|>] for multilingual models, <|sot|> for .en ones."""
        if task not in ("transcribe", "translate"):
            raise InputError(f"task must be 'transcribe' or 'translate', got {task!r}")
        if language is not None and language not in LANGUAGES:
            raise InputError(f"unknown language code {language!r}; Whisper's codes: {', '.join(sorted(LANGUAGES))}")
        if not self.multilingual:
            if language not in (None, "en"):
                raise InputError(f"this is an English-only (.en) model; language {language!r} is not supported")
            if task == "translate":
                raise InputError("this is an English-only (.en) model; it cannot translate")
            return (self.sot,)
        seq = [self.sot]
        if language is not None:
            seq.append(self.language_token(language))
        seq.append(self.transcribe if task == "transcribe" else self.translate)
        return tuple(seq)

    # ---- text
    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of the text tokens in `ids` (specials and timestamps dropped)."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) < self.eot], skip_special_tokens=False)

    @cached_property
    def non_speech_tokens(self) -> Tuple[int, ...]:
        """Tokens of symbols that are not speech (openai-whisper's `non_speech_tokens`)."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        misc = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(misc):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in misc:
                    result.add(tokens[0])
        return tuple(sorted(result))
