"""Suite-wide set-up: the same CPU arithmetic on every x86-64 host.

torch picks its CPU kernels by the host's instruction set (AVX2 or AVX-512 variants of every reduction),
MKL and oneDNN do the same (AVX-512, AMX). Sums then round in another order on an Intel Xeon than on an
AMD EPYC, and tests that compare bit for bit (llama.cpp numerics) or at near-ties would depend on the
host. Capping all three at AVX2 before torch is imported gives every host the arithmetic the tests were
written against (a host without AVX2 falls back to the default kernels). Set by the caller to override;
subprocesses started by tests inherit it.
"""

from __future__ import annotations

import os

HOST_INDEPENDENT_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _name, _value in HOST_INDEPENDENT_CPU.items():
    os.environ.setdefault(_name, _value)


import pytest  # noqa: E402  (after the CPU caps above, which must precede any torch import)


@pytest.fixture(scope="session")
def tiny_q4_1_gguf(tmp_path_factory):
    """A tiny random Llama written as a Q4_1 GGUF (untied head, so every linear is packed)."""
    pytest.importorskip("transformers")
    from tiny_llama import tiny_hf_model, write_gguf

    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-q4_1.gguf"
    write_gguf(path, tiny_hf_model("llama", tie_word_embeddings=False), qtype="Q4_1")
    return path
