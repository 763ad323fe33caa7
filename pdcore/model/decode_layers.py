"""An fp32 decode step's layers in one C call (kernels/decode_layers.c).

Why: at batch 1 the ~10 kernel calls per layer from Python (argument conversions, stride
checks) cost about a tenth of a token's time. `DecodeLayers` describes the model's layers
once -- each linear's packed weights, the norms, the layer's KV cache -- as the C structs
the loop reads, and then runs each decode step with one call. It applies where
LlamaModel._layers_native would call exactly the kernels the loop calls: fp32 activations,
one TP rank, and an attention backend that decodes with pdcore's C kernel
(`attention.C_DECODE_ATTENTION`); elsewhere `build` returns None and the Python loop runs.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from pdcore.model import native_cpu
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.linear import Linear
from pdcore.model.quantized import QuantLinear


def _c_linear(lin: Any) -> native_cpu.CLinear | None:
    """The C view of one linear, or None for a kind the loop does not run."""
    bias = getattr(lin, "bias", None)
    if bias is not None and bias.dtype != torch.float32:
        return None
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(lin, QuantLinear):
        w = lin.weight
        return native_cpu.CLinear(w.packed.data_ptr(), bias_ptr, w.n, w.k, 0, w.fmt, lin.act_parts)
    if isinstance(lin, Linear) and lin.is_native_packed():
        packed = lin.packed_weights()
        kind = 1 if packed.dtype == torch.float32 else 2
        n, k = lin.weight.shape
        return native_cpu.CLinear(packed.data_ptr(), bias_ptr, n, k, kind, 0, 0)
    return None


class DecodeLayers:
    """The C loop's description of one model's layers over one KV pool (`build`)."""

    def __init__(self, layers: ctypes.Array[native_cpu.CLayer], kern: native_cpu.Kernels) -> None:
        self._array = layers
        self._kern = kern

    @staticmethod
    def build(model: Any, pool: KVPool, kern: native_cpu.Kernels) -> DecodeLayers | None:
        """The loop for `model` over `pool`, or None where it does not apply. The structs
        hold raw pointers: the model's weights and the pool must outlive it (the model
        keeps it per pool)."""
        if kern.dtype != torch.float32 or pool.dtype != torch.float32 or model.tp.size != 1:
            return None
        array = (native_cpu.CLayer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            if layer.input_norm.dtype != torch.float32 or layer.post_norm.dtype != torch.float32:
                return None
            linears = [_c_linear(getattr(layer, n)) for n in ("qkv", "o_proj", "gate_up", "down")]
            if any(lin is None for lin in linears):
                return None
            array[i] = native_cpu.CLayer(
                layer.input_norm.data_ptr(), layer.post_norm.data_ptr(),
                pool.k_flat(i).data_ptr(), pool.v_flat(i).data_ptr(), *linears,
            )  # fmt: skip
        return DecodeLayers(array, kern)

    def run(
        self,
        model: Any,
        hidden: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        ws: dict[str, torch.Tensor],
        final_norm: torch.Tensor | None = None,
    ) -> None:
        """One decode step over every layer; `hidden` [t, h] fp32 contiguous, in place.
        With `final_norm` (the model's last RMSNorm weight, fp32) ws["x"][:t] ends as
        RMSNorm(hidden): the LM head's input."""
        cfg, meta = model.config, batch.attn_meta
        t, h = hidden.shape
        slots, lens = meta["slots"], meta["lens"]
        positions = batch.positions
        if positions.dtype != torch.int64 or not positions.is_contiguous():
            positions = positions.to(torch.int64).contiguous()
        self._kern.decode_layers_fn(
            hidden.data_ptr(), t, h, ctypes.addressof(self._array), len(self._array),
            model.rotary.cos.data_ptr(), model.rotary.sin.data_ptr(), positions.data_ptr(),
            slots.data_ptr(), slots.shape[1], batch.out_slots.data_ptr(), lens.data_ptr(),
            model.num_heads, model.num_kv_heads, cfg.head_dim, scale, cfg.rms_norm_eps,
            None if final_norm is None else final_norm.data_ptr(),
            ws["x"].data_ptr(), ws["qkv"].data_ptr(), ws["attn"].data_ptr(), ws["o"].data_ptr(),
            ws["gate_up"].data_ptr(), ws["act"].data_ptr(), ws["down"].data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
