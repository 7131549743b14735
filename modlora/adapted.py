"""The linear layers the model builds: :class:`FastLinear` everywhere, :class:`AdaptedLinear`
wherever adapters may attach. Both run through :mod:`modlora.ops` (the C++ op when decoding on a
CPU), and both are ``nn.Linear`` so parameter names stay HF's.

An adapted linear is an ``nn.Linear`` (the frozen base keeps its HF name, ``q_proj.weight``) plus an optional
``lora`` binding: a callable ``(x, weight, bias, training) -> y`` that computes the adapted output
(``training``: the module's mode, which switches LoRA dropout on). The
binding is not a submodule, so the state dict stays exactly the base checkpoint's.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from . import ops

LoraBinding = Callable[[Tensor, Tensor, Tensor | None, bool], Tensor]


class FastLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class AdaptedLinear(FastLinear):
    lora: LoraBinding | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.lora is None:
            return super().forward(x)
        return self.lora(x, self.weight, self.bias, self.training)
