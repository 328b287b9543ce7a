"""Resolve a model argument (local path or Hugging Face repo id) to a local directory or file.

Loading never touches the network: a repo id must already be in the local Hugging Face cache
(`edge-mmm pull REPO_ID` puts it there). A missing model is a `ModelFileError` that says how to get it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

from edge_mmm.errors import ModelFileError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    """True for 'owner/name' strings that are not an existing local path."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_model_path(name: str, required: Iterable[str] = (), cache_dir: Optional[str] = None) -> Path:
    """Return a local path for `name`: an existing file/dir, or a cached HF snapshot of repo id `name`.

    `required` lists files that must exist inside a directory model; a missing one is named in the error.
    """
    path = Path(name).expanduser()
    if path.exists():
        resolved = path.resolve()
    elif looks_like_repo_id(name):
        resolved = _cached_snapshot(name, cache_dir)
    else:
        raise ModelFileError(f"model '{name}' not found: no such file or directory, and not a repo id "
                             f"of the form owner/name")
    if resolved.is_dir():
        missing = [f for f in required if not (resolved / f).exists()]
        if missing:
            raise ModelFileError(f"model directory {resolved} is missing {', '.join(missing)}")
    return resolved


def _cached_snapshot(repo_id: str, cache_dir: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"model '{repo_id}' is not in the local Hugging Face cache; fetch it first with "
            f"`edge-mmm pull {repo_id}` (needs network), or pass a local directory") from exc
