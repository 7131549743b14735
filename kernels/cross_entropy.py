"""Cross-entropy of a linear layer's output without its logits: ``sum_i CE(h_i W^T, t_i)`` chunk by chunk.

The trainer's loss over a 151,936-token vocabulary: one chunk of fp32 logits [chunk, V] is alive at
a time, and the gradients w.r.t. ``h`` (and ``W``, when it trains) are computed in the same pass, so
the backward needs no logits either. Plain torch (any device); tested against ``F.cross_entropy`` of the full logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``softmax(h W^T)`` at ``targets``, chunk by chunk over the rows of h.

    Forward, per chunk c: ``z = h_c W^T`` (the GEMM in h's dtype, or autocast's; z then fp32, as
    transformers' loss takes the logits), ``loss += sum(lse(z) - z[target])`` and, with
    ``d = softmax(z) - onehot(target)``, ``dh_c = d W`` when h needs a gradient and ``dW += d^T h_c``
    (accumulated in fp32) when W does (full fine-tuning trains the output embedding). Backward
    scales both by the incoming gradient. What is kept for backward is dh [N, C] and dW [V, C], the
    sizes of h and W. ``grads``: grad mode at the call (inside ``forward`` it is always off); without
    it nothing is computed for backward, whatever requires grad.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, grads: bool) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None
        needs_w = grads and ctx.needs_input_grad[1]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = (hc @ weight.t()).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if grad_h is not None or grad_w is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's logits are no longer needed
                probs[torch.arange(len(tc), device=h.device), tc] -= 1.0
                if grad_h is not None:
                    grad_h[start:start + chunk] = probs.to(weight.dtype) @ weight
                if grad_w is not None:
                    grad_w.addmm_(probs.t(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_out.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 256) -> Tensor:
    """Sum over rows of ``CE(h W^T, targets)`` as a 0-dim fp32 tensor.

    Args:
        h: hidden states [N, C].
        weight: the output embedding [V, C]; it gets a gradient (accumulated in fp32) only when it
            requires one (full fine-tuning).
        targets: token ids [N].
        chunk: rows per chunk of logits (peak memory ``chunk * V`` fp32).

    Raises:
        ValueError: shapes or devices that do not fit, or ``chunk`` < 1.
        IndexError: a target outside ``[0, V)`` (checked on the CPU only: elsewhere reading the
            targets would wait for the device, and ``gather`` checks them).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h must be [N, C] and weight [V, C], got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != h.shape[0] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"linear_cross_entropy: targets must be int64 or int32 [{h.shape[0]}] (one per row of h), "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if len({h.device, weight.device, targets.device}) != 1:
        raise ValueError(f"linear_cross_entropy: h, weight and targets must be on one device, got {h.device}, "
                         f"{weight.device} and {targets.device}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be a positive integer, got {chunk!r}")
    if targets.is_cpu and targets.numel():
        lo, hi = (int(v) for v in torch.aminmax(targets))
        if lo < 0 or hi >= weight.shape[0]:
            raise IndexError(f"linear_cross_entropy: targets must lie in [0, {weight.shape[0]}), got {lo}..{hi}")
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, torch.is_grad_enabled())
