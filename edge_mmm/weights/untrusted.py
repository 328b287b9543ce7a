"""Reading a folder that someone else may have written (an export bundle): paths, links, modes, values.

- `inside(root, rel)`: a manifest path, resolved strictly inside `root`: relative, no `..`, no symlink on the
  way, so a manifest cannot point a loader at /etc or ../../other-model.
- `scan_tree(root)`: every entry under `root` a plain directory or a regular file, no symlinks and no hard
  links to files outside `root` (either lets a checked name read or follow another file), nothing writable
  by others.
- `open_nofollow(path)`: open for reading without following a symlink at the last component.
- `check_values(values, schema, name)`: a JSON config's keys known and its numbers in range, before any
  constructor sees them (a context of 10**12 would allocate until the machine dies).
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import warnings
from pathlib import Path, PurePosixPath
from typing import Dict, List, Mapping, Tuple

from edge_mmm.errors import ModelFileError

Range = Tuple[type, float, float]  # (type, minimum, maximum), both inclusive


def inside(root: Path, rel: object, what: str) -> Path:
    """`root / rel` for a relative POSIX path without `..`, empty parts or symlinks; else ModelFileError."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise ModelFileError(f"bundle {root}: {what} must be a relative path inside the bundle, got {rel!r}")
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise ModelFileError(f"bundle {root}: {what} {rel!r} leaves the bundle (absolute or '..' paths are "
                             f"refused)")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise ModelFileError(f"bundle {root}: {what} {rel!r} goes through a symlink ({path}); bundles hold "
                                 f"no links")
    return path


def scan_tree(root: Path) -> List[str]:
    """The bundle's regular files (POSIX paths relative to `root`), after checking every entry: no symlinks,
    no hard links out of the bundle, no devices/fifos, nothing world-writable (refused) or group-writable
    (warned)."""
    root = Path(root)
    files: List[str] = []
    group_writable: List[str] = []
    links: Dict[Tuple[int, int], list] = {}  # (dev, inode) -> [link count, first name, names inside]

    def check(path: Path, st: os.stat_result) -> None:
        rel = path.relative_to(root).as_posix() if path != root else "."
        if st.st_mode & stat.S_IWOTH:
            raise ModelFileError(f"bundle {root}: {rel} is writable by every user, so anyone could have replaced "
                                 f"a model after export; fix with: chmod -R o-w {root}")
        if st.st_mode & stat.S_IWGRP:
            group_writable.append(rel)

    check(root, os.lstat(root))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise ModelFileError(f"bundle {root}: {rel} is a symlink; a bundle holds only regular files "
                                     f"(re-export it)")
            if stat.S_ISDIR(st.st_mode):
                check(path, st)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ModelFileError(f"bundle {root}: {rel} is not a regular file")
            if st.st_nlink > 1:
                links.setdefault((st.st_dev, st.st_ino), [st.st_nlink, rel, 0])[2] += 1
            check(path, st)
            files.append(rel)
    for nlink, rel, inside_names in links.values():
        if inside_names < nlink:  # a name of this file lives outside the bundle: it can change behind it
            raise ModelFileError(f"bundle {root}: {rel} is a hard link to a file outside the bundle ({nlink} "
                                 f"names, {inside_names} inside); a bundle's files must be its own (copy it with "
                                 f"cp -r, not cp -l)")
    if group_writable:
        warnings.warn(f"bundle {root}: {group_writable[0]} (and {len(group_writable) - 1} more) is group-writable; "
                      f"group members could replace a model (chmod -R g-w {root})", stacklevel=3)
    return sorted(files)


def open_nofollow(path: Path):
    """A binary file object for `path`, refusing a symlink at its last component (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelFileError(f"cannot open {path} ({exc.strerror}): a bundle file must be a regular file, "
                             f"not a link") from exc
    return os.fdopen(fd, "rb")


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of an open binary file, read to its end."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def check_values(values: object, schema: Mapping[str, Range], name: str, required: bool = True) -> Dict:
    """A JSON object whose keys are all in `schema` (all present when `required`) and whose values have the
    schema's type and range; ModelFileError naming the file and the key otherwise."""
    if not isinstance(values, dict):
        raise ModelFileError(f"{name}: expected a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ModelFileError(f"{name}: unknown key {unknown[0]!r} (known: {', '.join(sorted(schema))})")
    if required:
        missing = sorted(set(schema) - set(values))
        if missing:
            raise ModelFileError(f"{name}: key {missing[0]!r} is missing")
    for key, value in values.items():
        kind, lo, hi = schema[key]
        ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ModelFileError(f"{name}: {key} must be {kind.__name__}, got {type(value).__name__}")
        if kind in (int, float) and not (math.isfinite(value) and lo <= value <= hi):
            raise ModelFileError(f"{name}: {key} = {str(value)[:24]} is out of "
                                 f"range [{lo:g}, {hi:g}]")
    return values
