"""A content-addressed cache of exported files: keyed by the source weights' sha256 and an exporter version,
each file's sha256 recorded in a manifest, verified on every use, rebuilt when stale or corrupt.
Builds happen in a temp directory that is renamed into place, so a crash never leaves a half cache entry.

Hashing ~100 MB of weights and graphs on every load costs ~0.4 s, so a full hash is remembered by the
file's stat stamp (size, mtime, ctime, inode), as git's index and make do: a file whose stamp is unchanged
is not hashed again. A stamp is only recorded for a file last changed more than `SETTLE_S` before the
hash (git's "racy" rule: a write within the timestamp granularity could keep the stamp). This is for the
user's own cache; bundles, which arrive from elsewhere, are fully verified every time (edge_mmm.bundle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

MANIFEST = "manifest.json"
DIGESTS = "digests.json"  # in the cache root: {source path: {"stamp": [...], "sha256": ...}}
SETTLE_S = 2.0


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: Path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _settled(stamp: list, now: float) -> bool:
    return now - max(stamp[1], stamp[2]) / 1e9 > SETTLE_S


def write_text_atomic(path: Path, text: str, umask_mode: bool = False) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one (a temp file beside it, renamed).
    The file is private (0600, as mkstemp makes it) unless `umask_mode`: then it gets the mode an ordinary
    new file would (0666 less the umask), as a command's output files should."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if umask_mode:
            umask = os.umask(0o022)  # reading the umask means setting it; put it back at once
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), or a copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def source_digest(root: Path, path: Path) -> str:
    """sha256 of a source file, remembered under `root` by its stat stamp (see the module doc)."""
    path = Path(path).resolve()
    store = Path(root) / DIGESTS
    try:
        known = json.loads(store.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    stamp = file_stamp(path)
    hit = known.get(str(path))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    now = time.time()
    digest = sha256_file(path)
    if _settled(stamp, now) and file_stamp(path) == stamp:
        known[str(path)] = {"stamp": stamp, "sha256": digest}
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            _write_json(store, known)
        except OSError:
            pass  # a read-only cache still works, it just hashes every time
    return digest


def default_cache_root() -> Path:
    """~/.cache/edge-mmm (or $XDG_CACHE_HOME/edge-mmm)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-mmm"


def cached_build(root: Path, kind: str, source: Path, version: str,
                 build: Callable[[Path], None], files: Iterable[str], extra_sources: Iterable[Path] = ()) -> Path:
    """Return a verified directory holding `files` built by `build(tmp_dir)` for this source + version.

    `extra_sources` (e.g. a config.json beside the weights) are hashed into the key too.
    """
    files = list(files)
    digest = source_digest(root, source)
    extras = [p for p in extra_sources if Path(p).exists()]
    if extras:
        digest = hashlib.sha256((digest + "".join(source_digest(root, p) for p in extras)).encode()).hexdigest()
    key = f"{digest[:24]}-{version}"
    entry = Path(root) / kind / key
    if verify_entry(entry, files):
        return entry
    with atomic_directory(entry) as tmp:
        build(tmp)
        manifest = {"source": str(source), "version": version,
                    "files": {name: sha256_file(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return entry


def cached_onnxruntime_graphs(graphs: Iterable[Path], kind: str, cache_root: Optional[Path] = None,
                              variant: str = "", rewrite: Optional[Callable[[Path], None]] = None,
                              extra_files: Iterable[str] = ()) -> Path:
    """A cache entry holding each of `graphs` (ONNX files of one export) as this onnxruntime optimizes it
    (`runners.ort_session.save_optimized_onnx`: fusions done, weights in a flat file beside each graph, so a
    session opens it without parsing the weights out of protobuf), under the same file names. Keyed by the
    graphs' content, the onnxruntime version and `variant` (bump it when `rewrite` changes): an onnxruntime
    upgrade re-optimizes (seconds, no torch) instead of re-exporting. `rewrite(tmp_dir)` may edit the
    optimized graphs before the entry is sealed, and write `extra_files` beside them (verified as the graphs)."""
    import onnxruntime

    from edge_mmm.runners.ort_session import external_data_name, save_optimized_onnx

    graphs = [Path(g) for g in graphs]

    def build(tmp: Path) -> None:
        for graph in graphs:
            save_optimized_onnx(graph, tmp / graph.name, f"ONNX graph {graph.name}")
        if rewrite is not None:
            rewrite(tmp)

    files = [f for g in graphs for f in (g.name, external_data_name(g.name))] + list(extra_files)
    version = f"ort{onnxruntime.__version__}" + (f"-{variant}" if variant else "")
    return cached_build(Path(cache_root) if cache_root else default_cache_root(), kind, graphs[-1], version, build,
                        files, extra_sources=graphs[:-1])


@contextmanager
def atomic_directory(dest: Path, shared: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `dest`; when the block succeeds it replaces `dest` by a rename,
    when it fails it is removed. Readers never see a half-written `dest`. `shared`: the result gets the
    usual umask modes (mkdtemp and some writers make private ones) like any folder the user creates."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if shared:
            umask = os.umask(0)
            os.umask(umask)
            for f in tmp.iterdir():
                if f.is_file():
                    os.chmod(f, 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def verify_entry(entry: Path, files: Iterable[str]) -> bool:
    """True if the entry's manifest lists `files` and every file's sha256 matches (a file whose stat stamp
    is the one recorded after its last full check counts as matching)."""
    files = list(files)
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        recorded = manifest["files"]
        stamps = manifest.get("stamps") or {}
        now = time.time()
        current = {name: file_stamp(entry / name) for name in files if name in recorded}
        if len(current) == len(files) and all(stamps.get(n) == st for n, st in current.items()):
            return True
        if not all(name in recorded and sha256_file(entry / name) == recorded[name] for name in files):
            return False
        if all(_settled(st, now) and file_stamp(entry / n) == st for n, st in current.items()):
            manifest["stamps"] = current
            try:
                _write_json(entry / MANIFEST, manifest)
            except OSError:
                pass
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
