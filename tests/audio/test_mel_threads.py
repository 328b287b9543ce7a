"""The numpy log-mel runs numpy's BLAS on the calling thread only (audio/mel.py `_blas_on_this_thread`): OpenBLAS's
worker threads busy-wait after a call, on the cores Whisper's encoder runs on next (docs/speech.md). The limit
holds during the filter-bank product and the process's setting is restored after, also with several threads."""

import threading

import numpy as np
from threadpoolctl import ThreadpoolController

from edge_mmm.audio import mel


def _blas_threads(controller):
    return [i["num_threads"] for i in controller.info() if i["user_api"] == "blas"]


def test_filter_bank_product_runs_on_one_blas_thread(monkeypatch):
    controller = ThreadpoolController()
    before = _blas_threads(controller)
    assert before, "numpy's BLAS is not visible to threadpoolctl"
    controller.limit(limits=2, user_api="blas")  # as a 2-core host's default (the limit is undone below)
    seen = []
    real = mel.mel_filters

    class Spy(np.ndarray):
        def __matmul__(self, other):
            seen.append(_blas_threads(controller))
            return np.asarray(self) @ other

    monkeypatch.setattr(mel, "mel_filters", lambda n: real(n).view(Spy))
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    out = mel.log_mel_spectrogram_np(audio)
    assert seen == [[1] * len(before)]
    assert _blas_threads(controller) == [2] * len(before)  # restored
    monkeypatch.setattr(mel, "mel_filters", real)
    assert np.array_equal(out, mel.log_mel_spectrogram_np(audio))

    results = []
    threads = [threading.Thread(target=lambda: results.append(mel.log_mel_spectrogram_np(audio))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, out) for r in results)
    assert _blas_threads(controller) == [2] * len(before)
    controller.limit(limits=before[0], user_api="blas")
