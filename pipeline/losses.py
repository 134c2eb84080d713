"""The language-model loss and the logits distillation term, computed together over the logits.

``lm_and_soft_ce(logits, targets, teacher_logits, temp, kd_weight)`` gives the mean next-token
cross-entropy (times ``lm_weight``, 1 by default) plus ``kd_weight`` times the soft cross-entropy against the teacher's softened
distribution (times ``temp ** 2``, as BMDistill defines it), and both terms apart for the log.
Both terms read the same (tokens, vocab) logits, so they and their gradient are computed in one
pass over blocks of rows small enough to stay in cache; the backward only scales that gradient.
(The separate autograd ops make a dozen passes over the whole logits.)
"""
from __future__ import annotations

import torch

BLOCK = 1 << 16  # elements per block of rows (256 KiB of fp32)


class _LmSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, teacher, temp: float, kd_weight: float, lm_weight: float):
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        lm = torch.zeros((), dtype=torch.float64, device=logits.device)
        kd = torch.zeros((), dtype=torch.float64, device=logits.device)
        rows = max(1, BLOCK // logits.shape[1])
        for i in range(0, n, rows):
            s, y, g = logits[i:i + rows], targets[i:i + rows, None], grad[i:i + rows]
            log_p = torch.log_softmax(s, dim=-1)
            lm -= log_p.gather(1, y).sum(dtype=torch.float64)
            torch.exp(log_p, out=g).mul_(lm_weight / n)  # d lm / d logits = (softmax(logits) - onehot) / n
            g.scatter_add_(1, y, torch.full(y.shape, -lm_weight / n, dtype=g.dtype, device=g.device))
            if teacher is None:
                continue
            if temp != 1:
                log_p = torch.log_softmax(s / temp, dim=-1)
            p_t = torch.softmax(teacher[i:i + rows] / temp if temp != 1 else teacher[i:i + rows], dim=-1)
            kd -= (p_t * log_p).sum(dtype=torch.float64)
            # d kd / d logits = temp * (softmax(logits / temp) - p_t) / n
            g.add_(log_p.exp_().sub_(p_t), alpha=kd_weight * temp / n)
        lm, kd = (lm / n).float(), (kd / n * temp**2).float()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lm, kd)
        return lm_weight * lm + kd_weight * kd, lm, kd

    @staticmethod
    def backward(ctx, g_total, _g_lm, _g_kd):
        (grad,) = ctx.saved_tensors
        return grad * g_total, None, None, None, None, None


def lm_and_soft_ce(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                   temp: float = 1.0, kd_weight: float = 1.0, lm_weight: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lm_weight * lm + kd_weight * kd, lm, kd) in fp32, differentiable through the first only: ``lm`` the mean
    cross-entropy of ``logits`` (..., vocab) against ``targets``, ``kd`` the mean soft
    cross-entropy against ``softmax(teacher_logits / temp)`` times ``temp ** 2`` (0 without a teacher)."""
    flat = logits.reshape(-1, logits.shape[-1]).float().contiguous()
    teacher = teacher_logits.reshape(flat.shape).float().contiguous() if teacher_logits is not None else None
    return _LmSoftCE.apply(flat, targets.reshape(-1), teacher, float(temp), float(kd_weight), float(lm_weight))
