"""oneDNN-packed Linear layers for CPU inference.

torch sends a float32 `nn.Linear` on CPU to MKL's sgemm. On AMD CPUs MKL does not use its fast code
paths (it dispatches on the vendor), so it reached about half of what oneDNN (shipped inside torch,
JIT-compiled for the CPU it runs on) reaches on the same shapes: measured on an AMD EPYC (Zen 5,
AVX-512) 2 cores, ViT-B shapes [4616, 768] x [768, 3072]: MKL 75 GFLOP/s, oneDNN with the weight
reordered once ("packed") 140-150 GFLOP/s; one decoding step of a batch of 8 ([8, 768] x [768, 3072]):
MKL 6 GFLOP/s, packed oneDNN 30-38 GFLOP/s (bench/bench_caption.py measures the model; the kernel
figures are its "linear kernels" rows). The packed weight is what torch.compile's CPU backend
(inductor, `freezing`) and Intel's extension build for inference; here it is done once at load time
with the same two operators inductor uses (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`),
without compiling anything.

The arithmetic stays in the layer's dtype (float32: IEEE float32, no implicit lower precision);
results differ from MKL's only in summation order (float rounding; tests/models/test_fast_linear.py
bounds it and checks greedy captions are unchanged). Inference only: the packed weight has no
gradient. `BLIP_PACKED_LINEAR=0` keeps torch's own Linear.

Memory: each packed weight replaces its layer's weight (the same number of bytes), and the checkpoint
pages of the weight it replaces are given back (models/mapped_pages.py), so the model does not
double. The layer keeps the packed tensor as `weight`: code that reads `layer.weight.dtype` or
`.shape` (BLIP-2's ITM heads do) still works; code that computes with the weight fails loudly
instead of silently using a stale copy.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from blip_toolkit.models.mapped_pages import CheckpointMappings, release, shared_storages

logger = logging.getLogger("blip")

# The batch-size hint oneDNN chooses its weight layout for. Measured on the shapes above: the layout
# for 8 rows was the fastest both for decoding steps (8 rows) and for the vision tower (4616 rows);
# the layout for the large row count was 8x slower on 8 rows.
PACK_BATCH_HINT = 8
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    """oneDNN is built into this torch and has the two operators (torch 2.x CPU builds on x86 and
    aarch64 do)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered once for oneDNN (CPU inference only).

    forward: x [..., in_features] -> [..., out_features] in the layer's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # An opaque oneDNN tensor, not a Parameter: it has no gradient and no state_dict entry.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=PACK_BATCH_HINT)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def packing_enabled() -> bool:
    return os.environ.get("BLIP_PACKED_LINEAR", "").strip().lower() not in ("0", "false", "no", "off")


def pack_linear_layers(model: nn.Module, device, *, quantize: str | None = None) -> int:
    """Replace every float32 / bfloat16 `nn.Linear` of `model` (on CPU, not quantized) by a
    `PackedLinear`, giving back the checkpoint pages of each replaced weight; returns how many.
    Tied weights (a Linear sharing its weight with an embedding) are packed too, and not released."""
    if (
        quantize is not None
        or torch.device(device).type != "cpu"
        or not packing_enabled()
        or not packing_available()
    ):
        return 0
    mappings = CheckpointMappings.current()
    tied = shared_storages(model)
    count = released = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.dtype not in PACKED_DTYPES:
                continue
            weight = child.weight
            setattr(parent, name, PackedLinear(child))
            count += 1
            if weight.untyped_storage().data_ptr() not in tied:
                released += release([weight], mappings)
    logger.debug("packed %d linear layers for oneDNN; %.0f MB of checkpoint pages released", count,
                 released / 2**20)  # fmt: skip
    return count
