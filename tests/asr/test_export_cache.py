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
    entry = next((tmp_path / "whisper-onnx").iterdir())
    (entry / "decoder.onnx").write_bytes(b"corrupt")
    asr2 = load_asr(tiny_en_dir, backend="onnxruntime", cache_dir=tmp_path, threads=2)
    assert asr2.transcribe(audio, TranscribeOptions(temperatures=(0.0,))).text == first.text
    assert "fox" in first.text.lower() or "dog" in first.text.lower()


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
