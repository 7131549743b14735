"""The linear layer the model builds wherever adapters may attach.

It is an ``nn.Linear`` (the frozen base keeps its HF name, ``q_proj.weight``) plus an optional
``lora`` binding: a callable ``(x, weight, bias) -> y`` that computes the adapted output. The
binding is not a submodule, so the state dict stays exactly the base checkpoint's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

LoraBinding = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class AdaptedLinear(nn.Linear):
    lora: LoraBinding | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.lora is None:
            return F.linear(x, self.weight, self.bias)
        return self.lora(x, self.weight, self.bias)
