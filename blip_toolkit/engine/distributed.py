"""Collectives of data-parallel training that losses need: features of every process's batch, for
in-batch negatives over the global batch (BLIP's ITC, the DiT's contrastive term)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class GatherWithGrad(torch.autograd.Function):
    """all_gather that passes gradients back to each rank's own slice (LAVIS `GatherLayer`; uses
    all_reduce, which gloo supports, unlike reduce_scatter)."""

    @staticmethod
    def forward(ctx, tensor):
        out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_all(tensor, *, grad: bool):
    """Concatenate `tensor` [B, ...] from every process (in rank order); identity on one process."""
    if not distributed():
        return tensor
    if grad and tensor.requires_grad:
        return torch.cat(GatherWithGrad.apply(tensor), dim=0)
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)
