"""`edge-mmm transcribe --format text|json|srt|vtt [--output-dir DIR]`: what goes where."""

from __future__ import annotations

import json
import os
import stat

import pytest

from edge_mmm.asr.subtitles import to_srt, to_vtt
from edge_mmm.cli import main


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from edge_mmm.audio.synth import SENTENCES, have_espeak, synthesize

    assert have_espeak(), "espeak-ng and sox are missing: the README's first command installs them"
    d = tmp_path_factory.mktemp("fmt-clips")
    return [synthesize(SENTENCES[i], d / f"clip{i}.wav", lead_silence=0.2, trail_silence=0.3) for i in (2, 5)]


@pytest.fixture(scope="module")
def asr(tiny_en_dir):
    from edge_mmm.asr.api import load_asr

    return load_asr(tiny_en_dir)


def _run(capsys, *args):
    code = main(["transcribe", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt,writer", [("srt", to_srt), ("vtt", to_vtt)])
def test_subtitles_on_stdout(capsys, clips, asr, tiny_en_dir, fmt, writer):
    code, out, _ = _run(capsys, clips[0], "--model", tiny_en_dir, "--format", fmt)
    assert code == 0 and out == writer(asr.transcribe(clips[0]).segments)


def test_output_dir_gets_one_file_each(capsys, clips, asr, tiny_en_dir, tmp_path):
    out_dir = tmp_path / "subs"
    old = os.umask(0o027)
    try:
        code, out, err = _run(capsys, *clips, "--model", tiny_en_dir, "-f", "srt", "-o", out_dir)
    finally:
        os.umask(old)
    assert code == 0 and out == ""
    for clip in clips:
        target = out_dir / f"{clip.stem}.srt"
        assert target.read_text() == to_srt(asr.transcribe(clip).segments)
        assert stat.S_IMODE(target.stat().st_mode) == 0o640  # an ordinary file under the umask, not 0600
        assert str(target) in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["clip2.srt", "clip5.srt"]  # no temp files left
    code, _, _ = _run(capsys, clips[0], "--model", tiny_en_dir, "--format", "json", "-o", out_dir)
    assert code == 0 and json.loads((out_dir / "clip2.json").read_text())["text"] == asr.transcribe(clips[0]).text
    code, _, _ = _run(capsys, clips[1], "--model", tiny_en_dir, "-o", out_dir)
    assert code == 0 and (out_dir / "clip5.txt").read_text() == asr.transcribe(clips[1]).text + "\n"


@pytest.mark.parametrize("extra,needle", [(("-f", "srt"), "needs --output-dir"),
                                          (("-f", "xml"), "--format must be one of"),
                                          (("-f", "srt", "--json"), "disagree"),
                                          (("-f", "vtt", "-o", "SAME"), "would write clip2.vtt")])
def test_format_errors(capsys, clips, tiny_en_dir, tmp_path, extra, needle):
    second = clips[1]
    if "SAME" in extra:  # two inputs with one name in different folders
        (tmp_path / "other").mkdir()
        second = tmp_path / "other" / clips[0].name
        second.write_bytes(clips[0].read_bytes())
        extra = tuple(str(tmp_path / "out") if e == "SAME" else e for e in extra)
    code, _, err = _run(capsys, clips[0], second, "--model", tiny_en_dir, *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_standard_input(capsys, clips, asr, tiny_en_dir, monkeypatch):
    """`-` reads one audio file from standard input (`ffmpeg ... | edge-mmm transcribe -`)."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(clips[1].read_bytes())))
    code, out, _ = _run(capsys, "-", "--model", tiny_en_dir, "--format", "json")
    assert code == 0 and json.loads(out)["text"] == asr.transcribe(clips[1]).text
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not audio at all" * 10)))
    code, _, err = _run(capsys, "-", "--model", tiny_en_dir)
    assert code == 2 and "standard input" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "-", "-", "--model", tiny_en_dir)
    assert code == 2 and "read once" in err
