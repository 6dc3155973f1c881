"""DINO's self-distillation loss: centering, sharpening, teacher-temperature warm-up.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(https://arxiv.org/abs/2104.14294), Algorithm 1. The teacher's outputs on the global crops are
centred (an EMA of their batch mean is subtracted, which stops one dimension from dominating)
and sharpened (a low temperature, which stops them from going uniform), then every student
crop is trained to match every teacher crop of a *different* view by cross-entropy. Only the
combination of the two avoids collapse, so :func:`collapse_stats` reports the two failure
modes for logging: a teacher entropy near 0 (one dimension wins) or near ``log K``
(uniform), and a KL from each teacher output to the batch-mean output near 0 (every image
gets the same output, whichever the mode).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .schedules import warmup_cosine

__all__ = ["DINOLoss", "collapse_stats"]


@torch.no_grad()
def collapse_stats(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of a batch of teacher distributions ``(B, K)``.

    Returns:
        ``teacher_entropy``: mean over samples of ``H(p_i)`` (``log K`` for uniform outputs,
        0 for one-hot ones); ``teacher_kl_to_mean``: mean of ``KL(p_i || p_mean)`` with
        ``p_mean`` the batch-mean distribution (0 when every sample gets the same output).
    """
    probs = probs.float()
    log_p = probs.clamp_min(1e-12).log()
    mean = probs.mean(dim=0, keepdim=True)
    entropy = -(probs * log_p).sum(dim=-1)
    kl = (probs * (log_p - mean.clamp_min(1e-12).log())).sum(dim=-1)
    return {"teacher_entropy": entropy.mean(), "teacher_kl_to_mean": kl.mean()}


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over view pairs.

    Args:
        out_dim: Output dimension ``K`` of the heads.
        ncrops: Student crops per image (2 global + the local ones).
        warmup_teacher_temp: Teacher temperature at epoch 0.
        teacher_temp: Teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: Epochs of linear warm-up of the teacher temperature.
        nepochs: Epochs of training.
        student_temp: Student temperature.
        center_momentum: EMA momentum of the centre.

    Call with ``(student_output, teacher_output, epoch)``: student outputs ``(ncrops * B, K)``
    and teacher outputs ``(n_global * B, K)``, both crop-major (all images of crop 0, then
    crop 1, ...), the teacher's crops being the student's first ``n_global``. Returns
    ``(loss, stats)``; ``stats`` holds :func:`collapse_stats`, ``kl_teacher_student`` (the
    loss minus the teacher entropy) and ``teacher_temp``. In training mode the centre is then
    updated from the teacher outputs (averaged over all processes when ``torch.distributed``
    is initialised).
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 0,
        nepochs: float = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"ncrops={ncrops} must be >= 2 (DINO pairs different views)")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.warmup_teacher_temp = warmup_teacher_temp
        self.final_teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.nepochs = nepochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, epoch: float) -> float:
        """The teacher temperature at ``epoch``: linear warm-up, then constant."""
        return warmup_cosine(
            epoch,
            self.nepochs,
            self.final_teacher_temp,
            self.final_teacher_temp,
            self.warmup_teacher_temp_epochs,
            self.warmup_teacher_temp,
        )

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, rem = divmod(student_output.shape[0], self.ncrops)
        n_global = teacher_output.shape[0] // max(batch, 1)
        if rem or batch == 0 or n_global * batch != teacher_output.shape[0]:
            raise ValueError(
                f"student output {tuple(student_output.shape)} is not {self.ncrops} crops of "
                f"the batch that teacher output {tuple(teacher_output.shape)} has crops of"
            )
        if not 1 <= n_global <= self.ncrops:
            raise ValueError(f"{n_global} teacher crops for {self.ncrops} student crops")
        temp = self.teacher_temp(epoch)
        log_s = (student_output.float() / self.student_temp).log_softmax(dim=-1)
        t = ((teacher_output.detach().float() - self.center) / temp).softmax(dim=-1)
        log_s = log_s.reshape(self.ncrops, batch, -1)
        # cross[g, v] = mean over images of H(teacher crop g, student crop v).
        cross = -torch.einsum("gbk,vbk->gv", t.reshape(n_global, batch, -1), log_s) / batch
        same_view = torch.eye(n_global, self.ncrops, dtype=torch.bool, device=cross.device)
        loss = cross[~same_view].mean()

        stats = collapse_stats(t)
        stats["kl_teacher_student"] = loss.detach() - stats["teacher_entropy"]
        stats["teacher_temp"] = torch.tensor(temp)
        if self.training:
            self.update_center(teacher_output)
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``center = m * center + (1 - m) * mean(teacher_output)`` over all processes."""
        batch_sum = teacher_output.detach().float().sum(dim=0, keepdim=True)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(
            batch_sum / count, alpha=1.0 - self.center_momentum
        )
