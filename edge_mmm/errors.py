"""One exception family for everything that crosses the package boundary.

The CLI maps every `EdgeMMMError` to exit code 2 and a single line; anything else is a bug.
"""

from __future__ import annotations


class EdgeMMMError(Exception):
    """Base class: a problem the user can fix (bad file, bad flag, missing extra)."""


class InputError(EdgeMMMError):
    """Bad user input: an unreadable audio/image file, an empty prompt, a bad option value."""


class ContextOverflowError(InputError):
    """A prompt does not fit the loaded context (prompt + at least one new token)."""

    def __init__(self, prompt_tokens: int, context_length: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens but the context holds {context_length} "
                         f"(prompt + at least one new token); shorten it or load with a larger context")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class ModelFileError(EdgeMMMError):
    """A model file or directory is missing, truncated, corrupt or inconsistent with its config."""


class DeviceError(EdgeMMMError):
    """The requested device/backend is unavailable or a plan does not fit on it."""


class MissingExtraError(EdgeMMMError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""

    def __init__(self, module: str, extra: str, purpose: str = ""):
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"optional dependency '{module}' is not installed{what}; "
                         f"install it with: pip install 'edge-mmm[{extra}]'")
        self.module = module
        self.extra = extra


def require(module: str, extra: str, purpose: str = ""):
    """Import an optional module lazily, or raise MissingExtraError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, purpose) from exc
