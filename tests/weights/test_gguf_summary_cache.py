"""A GGUF's metadata summary is parsed once and kept in the export cache: a new process reads the same
metadata and tensor names from JSON; a damaged cached copy is rebuilt; a corrupt GGUF is still refused."""

import json

import pytest

from edge_mmm.errors import ModelFileError
from edge_mmm.weights import gguf_lm


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf_lm._summary.cache_clear()
    yield tmp_path / "xdg" / "edge-mmm" / gguf_lm.SUMMARY_KIND
    gguf_lm._summary.cache_clear()


@pytest.fixture()
def tiny_gguf(tiny_q4_1_gguf):
    return tiny_q4_1_gguf


def test_summary_is_cached_and_equal_to_a_parse(cache, tiny_gguf):
    reader = gguf_lm.open_gguf(tiny_gguf)
    want = gguf_lm.gguf_metadata(reader, tiny_gguf), tuple(t.name for t in reader.tensors)
    first = gguf_lm.gguf_summary(tiny_gguf)
    gguf_lm._summary.cache_clear()  # as a new process would
    second = gguf_lm.gguf_summary(tiny_gguf)
    assert first == second == want
    entry = next(cache.iterdir())
    assert json.loads((entry / gguf_lm.SUMMARY_FILE).read_text())["tensors"] == list(want[1])


def test_damaged_cached_summary_is_rebuilt(cache, tiny_gguf):
    gguf_lm.gguf_summary(tiny_gguf)
    entry = next(cache.iterdir())
    data = json.loads((entry / gguf_lm.SUMMARY_FILE).read_text())
    data["metadata"]["llama.block_count"] = 99
    (entry / gguf_lm.SUMMARY_FILE).write_text(json.dumps(data))
    gguf_lm._summary.cache_clear()
    meta, _ = gguf_lm.gguf_summary(tiny_gguf)
    assert meta["llama.block_count"] == 2


def test_truncated_gguf_is_refused_and_not_cached(cache, tiny_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        gguf_lm.gguf_summary(bad)
    assert not cache.exists() or not any(cache.iterdir())
