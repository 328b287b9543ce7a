"""An nn.Embedding that can be built on the meta device cheaply."""

from __future__ import annotations

import torch
from torch import nn


def embedding(rows: int, dim: int) -> nn.Embedding:
    """`nn.Embedding(rows, dim)` with its usual N(0, 1) init, except on the meta device (inside
    `with torch.device("meta")`), where the table stays empty: a `normal_` on a meta tensor imports
    torch._dynamo, ~0.8 s the first time in a process, for values a checkpoint replaces anyway."""
    weight = torch.empty(rows, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)
