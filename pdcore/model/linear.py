"""Matmuls against weights pre-packed for the CPU's GEMM libraries.

On CPUs, a decode step is a handful of skinny matmuls per layer; packing each weight once
(MKL's packed sgemm for fp32, oneDNN's blocked layout for bf16/fp16) removes the per-call
re-layout that plain F.linear pays, roughly halving matmul time at batch 8-32 here. On CPUs
with AVX512-BF16, bf16 and fp32 weights instead go to our own skinny GEMM (`native_cpu`) for
decode-sized inputs, and to plain F.linear for prefill-sized ones (one re-layout per call is
nothing next to a large matmul: prefill measured equal to transformers' F.linear in both
dtypes). Anywhere the packed ops are missing (CUDA, other builds), it is plain F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pdcore.model import native_cpu


def _packing_enabled(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("PDCORE_DISABLE_PACKED_LINEAR", "") in ("", "0")


class Linear:
    """y = x @ W.T + b, with W pre-packed when the platform supports it."""

    __slots__ = ("weight", "bias", "_packed", "_kind", "_native")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self._packed = None
        self._kind = "plain"
        self._native = None
        if not _packing_enabled(weight.device):
            return
        if native_cpu.can_pack(weight):
            self._native = native_cpu.kernels(weight.dtype)
        if self._native is not None:
            self._packed, self._kind = native_cpu.pack(weight), "native"
            return
        try:
            if weight.dtype == torch.float32 and torch._C.has_mkl:
                self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
                self._kind = "mkl"
            elif (
                weight.dtype in (torch.bfloat16, torch.float16)
                and torch.backends.mkldnn.is_available()
            ):
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                self._kind = "mkldnn"
        except (RuntimeError, AttributeError):  # op missing in this torch build
            self._packed, self._kind = None, "plain"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None and x.dim() == 2 and x.shape[0] <= native_cpu.MAX_ROWS:
            return self._native.gemm(x, self._packed, self.weight.shape[0], self.bias)
        if self._kind == "mkl":
            return torch.ops.mkl._mkl_linear(x, self._packed, self.weight, self.bias, x.shape[0])
        if self._kind == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
