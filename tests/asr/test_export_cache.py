"""The ONNX export cache: reused when intact, rebuilt when corrupt, never left half-written."""

from __future__ import annotations

import pytest

from edge_mmm.weights.export_cache import cached_build


def _builder(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "a.onnx").write_bytes(b"graph-a")
        (tmp / "b.onnx").write_bytes(b"graph-b")
    return build


def test_reuse_and_rebuild_on_corruption(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"weights-v1")
    calls = []
    entry = cached_build(tmp_path / "cache", "kind", src, "v1", _builder(calls), ["a.onnx", "b.onnx"])
    again = cached_build(tmp_path / "cache", "kind", src, "v1", _builder(calls), ["a.onnx", "b.onnx"])
    assert entry == again and len(calls) == 1
    (entry / "a.onnx").write_bytes(b"graph-a-corrupted")
    cached_build(tmp_path / "cache", "kind", src, "v1", _builder(calls), ["a.onnx", "b.onnx"])
    assert len(calls) == 2 and (entry / "a.onnx").read_bytes() == b"graph-a"
    src.write_bytes(b"weights-v2")  # new weights: a new entry, the old one untouched
    other = cached_build(tmp_path / "cache", "kind", src, "v1", _builder(calls), ["a.onnx", "b.onnx"])
    assert other != entry and len(calls) == 3


def test_failed_build_leaves_nothing(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"w")

    def boom(tmp):
        (tmp / "a.onnx").write_bytes(b"half")
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError):
        cached_build(tmp_path / "cache", "kind", src, "v1", boom, ["a.onnx"])
    assert list((tmp_path / "cache" / "kind").iterdir()) == []


def test_onnx_backend_cache_end_to_end(tmp_path, tiny_en_dir, speech_clips):
    from edge_mmm.asr.api import TranscribeOptions, load_asr

    asr = load_asr(tiny_en_dir, backend="onnxruntime", cache_dir=tmp_path, threads=2)
    path, text, audio = speech_clips[0]
    first = asr.transcribe(path, TranscribeOptions(temperatures=(0.0,)))
    import onnxruntime

    # the portable export (bundles copy it) and, beside it, the graphs as this onnxruntime optimized them,
    # weights in a flat file beside each, keyed by the onnxruntime version
    assert {f.name for f in next((tmp_path / "whisper-onnx").iterdir()).iterdir()} >= {"encoder.onnx", "decoder.onnx"}
    entry = next((tmp_path / "whisper-onnx-ort").iterdir())
    from edge_mmm.asr.api import ORT_GRAPHS_VERSION

    assert entry.name.endswith(f"-ort{onnxruntime.__version__}-{ORT_GRAPHS_VERSION}")
    assert {"encoder.onnx.data", "decoder.onnx.data", "decoder_pack.json", "decoder_pack.bin"} \
        <= {f.name for f in entry.iterdir()}
    # the C decoder's weights in the checkpoint's fp16: about half the fp32 decoder graph's bytes; one file on
    # disk with the portable export's (a hard link)
    assert asr.backend.cpu_decoder is not None
    assert (entry / "decoder_pack.bin").stat().st_size < 0.55 * (entry / "decoder.onnx.data").stat().st_size
    export = next((tmp_path / "whisper-onnx").iterdir())
    assert (entry / "decoder_pack.bin").samefile(export / "decoder_pack.bin")
    assert (entry / "decoder.onnx").stat().st_size < 1_000_000 < (entry / "decoder.onnx.data").stat().st_size
    import onnx

    # the tied token embedding (embedding Gather + output projection) is one table, stored [d, n_vocab] and
    # listed as an overridable initializer: onnxruntime keeps it once instead of prepacking a second copy
    graph = onnx.load(str(entry / "decoder.onnx"), load_external_data=False).graph
    shared = {i.name for i in graph.input} & {i.name for i in graph.initializer}
    assert len(shared) == 1
    (name,) = shared
    assert {n.op_type for n in graph.node if name in n.input} == {"Gather", "MatMul"}
    dims = next(list(i.dims) for i in graph.initializer if i.name == name)
    assert dims == [asr.backend.config.n_text_state, asr.backend.config.n_vocab]
    data = entry / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-4096] + bytes(4096))  # same size, other weights: must be caught
    asr2 = load_asr(tiny_en_dir, backend="onnxruntime", cache_dir=tmp_path, threads=2)
    assert asr2.transcribe(audio, TranscribeOptions(temperatures=(0.0,))).text == first.text
    assert "fox" in first.text.lower() or "dog" in first.text.lower()


@pytest.mark.slow  # ~40 s (an int8 Whisper export); CI time
def test_int8_precision(tmp_path, tiny_en_dir, speech_clips):
    """INT8 ONNX: a separate cache entry, smaller encoder, transcripts close to the spoken words."""
    import jiwer

    from edge_mmm.asr.api import TranscribeOptions, load_asr
    from edge_mmm.errors import InputError

    with pytest.raises(InputError, match="onnxruntime"):
        load_asr(tiny_en_dir, backend="torch", precision="int8")
    fp32 = load_asr(tiny_en_dir, backend="onnxruntime", cache_dir=tmp_path, threads=2)
    int8 = load_asr(tiny_en_dir, backend="onnxruntime", cache_dir=tmp_path, threads=2, precision="int8")
    entries = sorted((tmp_path / "whisper-onnx").iterdir())
    assert len(entries) == 2
    sizes = [(e / "encoder.onnx").stat().st_size for e in entries]
    assert min(sizes) < 0.5 * max(sizes)
    opts = TranscribeOptions(temperatures=(0.0,))
    refs = [text.lower() for _, text, _ in speech_clips[:4]]
    clean = lambda s: "".join(c for c in s.lower() if c.isalnum() or c.isspace())  # noqa: E731
    w32 = jiwer.wer([clean(r) for r in refs], [clean(fp32.transcribe(a, opts).text) for _, _, a in speech_clips[:4]])
    w8 = jiwer.wer([clean(r) for r in refs], [clean(int8.transcribe(a, opts).text) for _, _, a in speech_clips[:4]])
    assert w8 <= w32 + 0.15, (w32, w8)


def _count_hashes(monkeypatch):
    from edge_mmm.weights import export_cache

    calls = []
    real = export_cache.sha256_file
    monkeypatch.setattr(export_cache, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    return calls


def test_settled_files_are_not_hashed_again(tmp_path, monkeypatch):
    """After one full check, an entry and a source whose stat stamps are unchanged load without hashing;
    any change to a file (same size included) is hashed again and caught."""
    import time

    from edge_mmm.weights import export_cache

    monkeypatch.setattr(export_cache, "SETTLE_S", 0.0)  # files written here are "old enough" at once
    src = tmp_path / "weights.bin"
    src.write_bytes(b"weights-v1")
    builds, hashes = [], _count_hashes(monkeypatch)
    time.sleep(0.05)
    args = (tmp_path / "cache", "kind", src, "v1", _builder(builds), ["a.onnx", "b.onnx"])
    entry = cached_build(*args)
    time.sleep(0.05)
    cached_build(*args)  # full check of the entry, stamps recorded
    hashes.clear()
    assert cached_build(*args) == entry and hashes == [] and len(builds) == 1
    (entry / "a.onnx").write_bytes(b"graph-X")  # same size, new content: the stamp changed
    time.sleep(0.05)
    assert cached_build(*args) == entry and len(builds) == 2 and (entry / "a.onnx").read_bytes() == b"graph-a"
    src.write_bytes(b"weights-v2")  # same size: a new source digest, a new entry
    time.sleep(0.05)
    assert cached_build(*args) != entry and len(builds) == 3


def test_fresh_files_are_always_hashed(tmp_path, monkeypatch):
    """A file changed within SETTLE_S of its check gets no stamp (a same-size rewrite inside the timestamp
    granularity could keep it), so it is hashed on every use until it settles."""
    src = tmp_path / "weights.bin"
    src.write_bytes(b"weights-v1")
    builds, hashes = [], _count_hashes(monkeypatch)
    args = (tmp_path / "cache", "kind", src, "v1", _builder(builds), ["a.onnx", "b.onnx"])
    entry = cached_build(*args)
    hashes.clear()
    cached_build(*args)
    assert len(hashes) == 3 and len(builds) == 1  # source + both files, nothing trusted yet
    (entry / "b.onnx").write_bytes(b"graph-X")
    cached_build(*args)
    assert len(builds) == 2 and (entry / "b.onnx").read_bytes() == b"graph-b"
