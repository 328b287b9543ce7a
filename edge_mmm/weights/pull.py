"""`edge-mmm pull`: download a model repo into the Hugging Face cache, only the files we load.

`huggingface_hub.snapshot_download` does the work: resumable (partial blobs are continued), a progress
bar per file, honoring HF_HUB_OFFLINE / HF_HUB_CACHE / HF_ENDPOINT as huggingface_hub always does. Every
other command then accepts the repo id (`weights/hub.py::resolve_model_path`, cache only, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.weights.hub import looks_like_repo_id

# Configs, safetensors weights, tokenizer and processor files: what our HF loaders read (LM, VLM, Whisper).
# Repos often also hold ONNX exports, GGUF variants or PyTorch .bin files we do not need.
DEFAULT_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja",
)


def pull_model(repo_id: str, include: Optional[Sequence[str]] = None, cache_dir: Optional[str] = None,
               revision: Optional[str] = None) -> Path:
    """Download `repo_id` (files matching `include`, default `DEFAULT_PATTERNS`); returns the snapshot dir."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if not looks_like_repo_id(repo_id):
        raise InputError(f"'{repo_id}' is not a Hugging Face repo id (owner/name)")
    patterns: List[str] = list(include) if include else list(DEFAULT_PATTERNS)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelFileError(
            f"cannot fetch {repo_id}: the Hugging Face Hub is not reachable (offline, or HF_HUB_OFFLINE=1) and "
            f"the repo is not in the local cache{f' {cache_dir}' if cache_dir else ''}. Run `edge-mmm pull "
            f"{repo_id}` where there is network and copy the cache (or the model directory) here") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelFileError(f"cannot fetch {repo_id}: repository not found or access denied "
                             f"(gated repos need `hf auth login`)") from exc
    except RevisionNotFoundError as exc:
        raise ModelFileError(f"cannot fetch {repo_id}: revision {revision!r} not found") from exc
    except HfHubHTTPError as exc:
        raise ModelFileError(f"cannot fetch {repo_id}: {exc}") from exc
    except OSError as exc:  # disk full, permissions, interrupted writes
        raise ModelFileError(f"cannot write {repo_id} into the Hugging Face cache: {exc}") from exc
    if not any(p.is_file() for p in path.rglob("*")):
        raise ModelFileError(f"{repo_id}: no file matched {', '.join(patterns)} (use --include to choose files)")
    return path
