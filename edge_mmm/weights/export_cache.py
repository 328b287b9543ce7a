"""A content-addressed cache of exported files: keyed by the source weights' sha256 and an exporter version,
each file's sha256 recorded in a manifest, verified on every use, rebuilt when stale or corrupt.
Builds happen in a temp directory that is renamed into place, so a crash never leaves a half cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    digest = sha256_file(source)
    extras = [p for p in extra_sources if Path(p).exists()]
    if extras:
        digest = hashlib.sha256((digest + "".join(sha256_file(p) for p in extras)).encode()).hexdigest()
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
    """True if the entry's manifest lists `files` and every file's sha256 matches."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        recorded = manifest["files"]
        return all(name in recorded and sha256_file(entry / name) == recorded[name] for name in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False
