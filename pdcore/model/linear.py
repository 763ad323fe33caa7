"""Matmuls against weights pre-packed for the CPU's GEMM libraries or our own kernels.

On CPUs, a decode step is a handful of skinny matmuls per layer; packing each weight once
(MKL's packed sgemm for fp32, oneDNN's blocked layout for bf16/fp16) removes the per-call
re-layout that plain F.linear pays, roughly halving matmul time at batch 8-32. Where our
kernels build (`native_cpu`: AVX2+FMA, AVX512, AVX512-BF16 or NEON), bf16 and fp32 weights
instead go to our own skinny GEMM for decode-sized inputs, and to one library GEMM for
prefill-sized ones (one re-layout per call is nothing next to a large matmul).

Two rules keep the arithmetic fast on CPUs without bf16 arithmetic (AVX2, AVX512F, NEON):
- fp32 weights whose values bf16 holds exactly (a bf16 checkpoint run in fp32) are stored as
  bf16 -- half the bytes to stream per decode step, widened to fp32 in registers, bit for
  bit the same products;
- bf16 prefill GEMMs run in fp32 (weights widened per call, result rounded once to bf16, as
  a bf16 GEMM accumulating in fp32 does) instead of torch's emulated bf16 GEMM (~3x slower).
Anywhere the packed ops are missing (CUDA, other builds), it is plain F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pdcore.model import native_cpu
from pdcore.model.cpu_flags import cpu_computes_bf16


def _packing_enabled(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("PDCORE_DISABLE_PACKED_LINEAR", "") in ("", "0")


def bf16_exact(weight: torch.Tensor) -> bool:
    """Whether every value of an fp32 tensor survives a round trip through bf16."""
    return torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight)


class Linear:
    """y = x @ W.T + b, with W pre-packed when the platform supports it."""

    __slots__ = ("weight", "bias", "_packed", "_kind", "_native", "_fp32_prefill")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self._packed = None
        self._kind = "plain"
        self._native = None
        self._fp32_prefill = False
        if not _packing_enabled(weight.device):
            return
        if native_cpu.can_pack(weight):
            self._native = native_cpu.kernels(weight.dtype)
        if self._native is not None:
            if weight.dtype == torch.float32 and bf16_exact(weight):
                self.weight = weight.to(torch.bfloat16)  # nothing lost, half the bytes
            self._packed, self._kind = native_cpu.pack(self.weight), "native"
            self._fp32_prefill = weight.dtype == torch.bfloat16 and not cpu_computes_bf16()
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

    def is_native_packed(self) -> bool:
        """Whether decode sizes run our skinny GEMM on `packed_weights()` (fp32 or bf16)."""
        return self._kind == "native" and self._packed is not None

    def packed_weights(self) -> torch.Tensor:
        """The [N/16, K, 16] panels our skinny GEMM reads (only when is_native_packed())."""
        assert self._kind == "native" and self._packed is not None
        return self._packed

    def replace_packed_weights(self, packed: torch.Tensor) -> None:
        """Swap in an equal copy of `packed_weights()` held elsewhere (huge_pages.py)."""
        assert self._packed is not None and packed.shape == self._packed.shape
        assert packed.dtype == self._packed.dtype
        self._packed = packed

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + b. `out` (decode sizes, native kernels): a contiguous [rows, N] of x's
        dtype the result may be written into -- use the returned tensor either way."""
        if self._kind == "native":
            native, packed = self._native, self._packed
            assert native is not None and packed is not None  # set together with "native"
            if x.dim() == 2 and x.shape[0] <= native_cpu.MAX_ROWS:
                if out is not None and out.dtype != x.dtype:
                    out = None
                return native.gemm(x, packed, self.weight.shape[0], self.bias, out)
            if self._fp32_prefill:  # fp32 GEMM, one rounding to bf16
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        if self._kind == "mkl":
            return torch.ops.mkl._mkl_linear(x, self._packed, self.weight, self.bias, x.shape[0])
        if self._kind == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
