"""The official `openai` client against our server: chat (plain and streamed) and transcription."""

from __future__ import annotations

import pytest

from edge_mmm.text.generation import GenerationConfig

from .conftest import API_KEY

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_listed(client, models):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == models.lm_id and models.asr_id in ids


def test_chat_equals_local_greedy_generation(client, models):
    out = client.chat.completions.create(model=models.lm_id, messages=QUESTION, max_tokens=12, temperature=0)
    local = models.lm.generate(QUESTION, GenerationConfig(max_tokens=12))
    assert out.choices[0].message.content == local.text and local.text.strip()
    assert out.choices[0].finish_reason == local.finish_reason
    assert out.usage.completion_tokens == len(local.token_ids)
    assert out.usage.prompt_tokens == local.prompt_tokens


def test_chat_streaming(client, models):
    stream = client.chat.completions.create(model=models.lm_id, messages=QUESTION, max_tokens=12,
                                            temperature=0, stream=True)
    chunks = list(stream)  # the client stops at `data: [DONE]`
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for d in deltas if d) >= 2  # text arrived in pieces
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    plain = client.chat.completions.create(model=models.lm_id, messages=QUESTION, max_tokens=12, temperature=0)
    assert "".join(deltas) == plain.choices[0].message.content


@pytest.mark.slow  # ~28 s of generation; CI time
def test_max_tokens_capped(client, models, server):
    _, settings = server
    out = client.chat.completions.create(model=models.lm_id, max_tokens=10_000, temperature=0,
                                         messages=[{"role": "user", "content": "Count from 1 to 500."}])
    assert out.usage.completion_tokens <= settings.max_tokens


def test_transcription_of_espeak_clip(client, models, tmp_path):
    from edge_mmm.audio.synth import SENTENCES, have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    path = synthesize(SENTENCES[7], tmp_path / "meeting.wav", lead_silence=0.3, trail_silence=0.3)
    with open(path, "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-tiny.en", file=f)
    assert out.text == models.asr.transcribe(path).text
    assert "meeting has been moved to thursday" in out.text.lower()
    with open(path, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, response_format="text")
    assert text.strip() == out.text
    from edge_mmm.asr.subtitles import to_srt, to_vtt

    segments = models.asr.transcribe(path).segments
    for fmt, writer in (("srt", to_srt), ("vtt", to_vtt)):
        with open(path, "rb") as f:
            subs = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, response_format=fmt)
        assert subs == writer(segments), fmt


def test_transcription_language_field(client, models, tmp_path):
    """OpenAI's `language` field: a code the model takes is used, one it cannot take is a 400 naming it."""
    from edge_mmm.audio.synth import SENTENCES, have_espeak, synthesize

    assert have_espeak(), "espeak-ng and sox are missing: the README's first command installs them"
    path = synthesize(SENTENCES[3], tmp_path / "q.wav", lead_silence=0.3, trail_silence=0.3)
    with open(path, "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, language="en",
                                                 response_format="verbose_json")
    assert out.language == "en" and out.text == models.asr.transcribe(path).text
    from edge_mmm.asr.transcribe import TranscribeOptions

    hint = "Minutes of the weekly meeting."
    with open(path, "rb") as f:  # OpenAI's `prompt`: our initial_prompt
        prompted = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, prompt=hint)
    assert prompted.text == models.asr.transcribe(path, TranscribeOptions(initial_prompt=hint)).text
    for code, needle in (("xx", "unknown language code 'xx'"), ("de", "English-only")):
        with open(path, "rb") as f, pytest.raises(openai.BadRequestError) as info:
            client.audio.transcriptions.create(model="whisper-tiny.en", file=f, language=code)
        assert needle in info.value.body["message"] and info.value.body["param"] == "language"


def test_top_p_zero_is_the_most_likely_token(client, models):
    """OpenAI clients send top_p=0 for determinism: it keeps only the most likely token, so even at
    temperature 1 the answer is the greedy one (transformers and llama.cpp read it the same way)."""
    kw = dict(model=models.lm_id, messages=QUESTION, max_tokens=8)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    assert client.chat.completions.create(temperature=1.0, top_p=0, seed=5, **kw).choices[0].message.content == greedy


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
])
def test_unsupported_fields_are_refused_not_ignored(client, models, extra, param):
    """A field that would change the answer and is not implemented is a 400 naming it, never a silent answer;
    its neutral value is accepted (clients send it)."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=models.lm_id, messages=QUESTION, max_tokens=4, **extra)
    assert info.value.body["param"] == param
    neutral = client.chat.completions.create(model=models.lm_id, messages=QUESTION, max_tokens=4, temperature=0,
                                             presence_penalty=0, frequency_penalty=0, logprobs=False,
                                             response_format={"type": "text"}, tool_choice="none")
    assert neutral.choices[0].message.content
