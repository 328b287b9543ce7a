"""Numeric comparisons shared by tests (imported by name: pyproject puts tests/ on the path)."""

import numpy as np


def cosine(a, b) -> float:
    """Cosine similarity of two arrays or tensors, flattened, in float64."""
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, np.float64).ravel()
    b = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
