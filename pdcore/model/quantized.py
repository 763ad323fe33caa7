"""Weight-only quantized linear layers: weights stay 4.5-8.5 bits in memory, math stays fp32.

`--quantization` picks what the linear layers hold (SGLang's flag name):
- `gguf`: a GGUF's Q4_0, Q4_1 and Q8_0 tensors kept as shipped -- their blocks repacked
  once, byte for byte the same size (Q4_0 is widened to Q4_1's form: 20 bytes per 32 weights
  instead of 18), into panels of 16 output features the decode kernel reads with one load
  per k (kernels/quant_gemm.c). Other tensor types (F32 norms, K-quants...) are dequantized.
- `int8` / `w8a16`: any model's linear weights quantized at load to int8 with one fp32
  scale per output channel (symmetric, round to nearest).
- `none`: dequantized to the compute dtype at load, as before.
- `auto` (default): `gguf` for a GGUF on a CPU with our kernels, else `none`. Why keep the
  file's format by default: batch-1 decode streams every weight once per token, so Q4_1
  (5 bits) reads ~6x fewer bytes than fp32; and the kernel rebuilds each weight exactly as
  the dequantizing reference does, so the logits differ from the dequantized fp32 model by
  summation order only (see tests/test_quant_accuracy.py and docs/benchmarks.md).

Decode-sized inputs (up to native_cpu.MAX_ROWS rows) go to the quantized GEMM's integer dot
products; prefill-sized ones to a blocked GEMM that widens each weight once per call
into a cache-sized chunk (kernels/panel_gemm.c) -- widening the whole matrix into memory
for the library GEMM measured at parity with transformers' fp32 prefill; this 1.2-1.5x
per matrix at 512 rows (docs/benchmarks.md). It multiplies in fp32, or where the CPU has
bf16 dot products and --quantized-prefill-dtype resolves to bfloat16 (see prefill_bf16),
in bf16 with fp32 sums: ~1.9x, at bf16's rounding of the prompt's activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pdcore.model import native_cpu
from pdcore.model.quantization_flags import GGUF_ACTIVATION_PARTS, is_gguf

if TYPE_CHECKING:
    from pdcore.model.config import ModelConfig

logger = logging.getLogger(__name__)

FMT_Q4, FMT_Q8, FMT_I8 = 0, 1, 2  # kernels/quant_gemm.c's formats
GGUF_KERNEL_TYPES = {"Q4_0": FMT_Q4, "Q4_1": FMT_Q4, "Q8_0": FMT_Q8}
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class GGUFRows:
    """One GGUF tensor's raw blocks, one row of blocks per output feature (HF row order)."""

    type_name: str  # Q4_0, Q4_1 or Q8_0
    data: np.ndarray  # uint8 [N, K / 32 * block bytes]
    k: int


@dataclass(frozen=True)
class QuantWeight:
    """A [n, k] weight in one of the kernel's formats, packed in panels of 16 features."""

    fmt: int
    n: int
    k: int
    packed: torch.Tensor  # uint8
    label: str  # Q4_1, Q8_0, int8 ...

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


def _panels(a: np.ndarray) -> np.ndarray:
    """Zero-pad axis 0 to a multiple of 16 and split it: [N, ...] -> [N/16, 16, ...]."""
    pad = -a.shape[0] % 16
    if pad:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), dtype=a.dtype)])
    return a.reshape(-1, 16, *a.shape[1:])


def _groups(a: np.ndarray, unit: int) -> np.ndarray:
    """[N, nb, B] per-block bytes -> [P, 2, nb, B/unit, 8, unit]: per panel, each group of 8
    rows on its own, block after block, each block's bytes as units of `unit` consecutive
    bytes of the 8 rows side by side (kernels/quant_gemm.c's layout)."""
    p = _panels(a)  # [P, 16, nb, B]
    n_p, _, nb, nbytes = p.shape
    return p.reshape(n_p, 2, 8, nb, nbytes // unit, unit).transpose(0, 1, 3, 4, 2, 5)


def pack_gguf(rows: GGUFRows) -> QuantWeight:
    """Repack GGUF blocks into the kernel's panels (layout: kernels/quant_gemm.c)."""
    bb = _GGUF_BLOCK_BYTES[rows.type_name]
    n, nb = rows.data.shape[0], rows.k // 32
    blocks = np.ascontiguousarray(rows.data).reshape(n, nb, bb)
    d = blocks[:, :, 0:2]
    if rows.type_name == "Q8_0":
        parts = [d, blocks[:, :, 2:34]]
    elif rows.type_name == "Q4_1":
        parts = [d, blocks[:, :, 2:4], blocks[:, :, 4:20]]
    else:  # Q4_0: w = d * (q - 8) = d * q + m with m = -8d (exact in fp16)
        parts = [d, (d.view(np.float16) * np.float16(-8)).view(np.uint8), blocks[:, :, 2:18]]
    grouped = [_groups(a, 2 if a.shape[2] == 2 else 4) for a in parts]
    p = grouped[0].shape[0]
    packed = np.concatenate([g.reshape(p, 2, nb, -1) for g in grouped], axis=3)
    fmt = GGUF_KERNEL_TYPES[rows.type_name]
    return QuantWeight(fmt, n, rows.k, torch.from_numpy(packed.reshape(-1).copy()), rows.type_name)


def quantize_int8(weight: torch.Tensor) -> QuantWeight:
    """Symmetric int8 with one fp32 scale per output channel (max |w| / 127)."""
    w = weight.float()
    n, k = w.shape
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    s_p = _panels(scale.numpy())  # [P, 16] fp32
    q_p = _panels(q.numpy()).transpose(0, 2, 1)  # [P, k, 16]
    p = s_p.shape[0]
    packed = np.concatenate(
        [s_p.view(np.uint8).reshape(p, 64), q_p.view(np.uint8).reshape(p, -1)], 1
    )
    return QuantWeight(FMT_I8, n, k, torch.from_numpy(packed.reshape(-1).copy()), "int8")


class QuantLinear:
    """y = x @ W.T + b with W quantized; x and y in any float dtype. GGUF formats at decode
    sizes quantize x per 32 values into `act_parts` int8 parts (integer dot products);
    int8 per channel, and every format at prefill sizes, multiply fp32 x (the C kernel
    picks by row count)."""

    __slots__ = ("weight", "bias", "_kern", "act_parts", "prefill_bf16")

    def __init__(
        self,
        weight: QuantWeight,
        bias: torch.Tensor | None,
        kern: native_cpu.Kernels,
        act_parts: int = 2,
        prefill_bf16: bool = False,
    ) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.float().contiguous()
        self._kern = kern
        self.act_parts = act_parts  # GGUF formats: int8 parts per activation (1 or 2)
        self.prefill_bf16 = prefill_bf16  # --quantized-prefill-dtype bfloat16 (resolved)

    @property
    def out_features(self) -> int:
        return self.weight.n

    def dequantize(self) -> torch.Tensor:
        w = self.weight
        return self._kern.quant_dequantize(w.packed, w.fmt, w.n, w.k)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + b. `out` (decode sizes): a contiguous fp32 [rows, N] the result may be
        written into -- use the returned tensor either way."""
        x32 = x if x.dtype == torch.float32 else x.float()
        w = self.weight
        shape = x32.shape
        rows = x32.numel() // w.k
        if out is not None and (out.dtype != torch.float32 or rows > native_cpu.MAX_ROWS):
            out = None
        y = self._kern.quant_gemm(
            x32.reshape(-1, w.k),
            w.packed,
            w.fmt,
            w.n,
            w.k,
            self.bias,
            self.act_parts,
            out,
            self.prefill_bf16,
        ).view(*shape[:-1], w.n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class QuantizedWeights:
    """The linear weights a model keeps quantized: GGUF blocks by HF name (`gguf`), or
    int8 made from the dense weights at load (`int8`)."""

    def __init__(
        self,
        method: str,
        kern: native_cpu.Kernels,
        gguf_rows: dict[str, GGUFRows] | None = None,
        act_parts: int = 2,
        prefill_bf16: bool = False,
    ) -> None:
        assert method in ("gguf", "int8")
        self.method = method
        self.kern = kern
        self.gguf_rows = gguf_rows or {}
        self.act_parts = act_parts
        self.prefill_bf16 = prefill_bf16
        self.dense: list[str] = []  # weights that fell back to dense, for the log

    def linear(
        self,
        names: list[str],
        state: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
    ) -> QuantLinear | None:
        """The rows of `names` stacked (a fused projection) as one quantized layer, or None
        when they cannot be (a type the kernel lacks, mixed types): the caller goes dense."""
        if self.method == "int8":
            w = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
            return QuantLinear(quantize_int8(w), bias, self.kern, prefill_bf16=self.prefill_bf16)
        parts = [self.gguf_rows.get(n) for n in names]
        first = parts[0]
        if first is None or any(p is None or p.type_name != first.type_name for p in parts):
            self.dense.extend(names)
            return None
        data = np.concatenate([p.data for p in parts if p is not None])
        qw = pack_gguf(GGUFRows(first.type_name, data, first.k))
        return QuantLinear(qw, bias, self.kern, self.act_parts, self.prefill_bf16)


def resolve(method: str, model_source: str, device: torch.device, tp_size: int) -> tuple[str, str]:
    """The method to load with (gguf, int8 or none) and why. Raises ValueError for an
    explicit method the device cannot run (the CLI catches the others earlier)."""
    method = "int8" if method == "w8a16" else method
    if method == "none":
        return "none", "--quantization none"
    if device.type != "cpu" or tp_size > 1:
        why = f"device {device}" if device.type != "cpu" else "--tp-size > 1"
        if method == "auto":
            return "none", f"auto: dequantized ({why})"
        raise ValueError(f"--quantization {method}: quantized weights need a CPU, one rank ({why})")
    if native_cpu.kernels(torch.float32) is None:
        why = f"no CPU kernels: {native_cpu.describe()}"
        if method != "auto":
            logger.warning("--quantization %s ignored, weights dequantized (%s)", method, why)
        return "none", why
    if method == "auto":
        if not is_gguf(model_source):
            return "none", "auto: dense checkpoint served as stored"
        return "gguf", "auto: a GGUF keeps its file's format"
    return method, f"--quantization {method}"


def load_quantized(
    method: str,
    model_source: str,
    config: ModelConfig,
    device: torch.device,
    tp_size: int,
    gguf_activations: str = "int16",
    prefill_dtype: str = "auto",
    dtype_flag: str = "auto",
) -> QuantizedWeights | None:
    """The quantized weights for `method` (after `resolve`), or None to load dense;
    `gguf_activations` (int16 / int8): how the GGUF kernels quantize activations;
    `prefill_dtype` (auto / float32 / bfloat16): what their prefill GEMMs multiply in;
    `dtype_flag`: --dtype as given (an explicit float32 keeps auto's prefill fp32)."""
    chosen, why = resolve(method, model_source, device, tp_size)
    logger.info("quantization: %s (%s)", chosen, why)
    if chosen != "gguf" and gguf_activations != "int16":
        logger.warning("--gguf-activations %s has no effect: %s", gguf_activations, why)
    if chosen == "none":
        if prefill_dtype != "auto":
            logger.warning("--quantized-prefill-dtype %s has no effect: %s", prefill_dtype, why)
        return None
    kern = native_cpu.kernels(torch.float32)
    assert kern is not None  # resolve() checked
    bf16 = prefill_bf16(prefill_dtype, kern, dtype_flag)
    if chosen == "int8":
        return QuantizedWeights("int8", kern, prefill_bf16=bf16)
    from pdcore.model.gguf_loader import read_gguf_quantized

    parts = GGUF_ACTIVATION_PARTS[gguf_activations]
    logger.info("GGUF activations at decode sizes: %s (%d int8 parts)", gguf_activations, parts)
    rows = read_gguf_quantized(Path(model_source), config)
    return QuantizedWeights("gguf", kern, rows, parts, bf16)


def prefill_bf16(choice: str, kern: native_cpu.Kernels, dtype_flag: str = "auto") -> bool:
    """--quantized-prefill-dtype resolved for these kernels (logged). auto: bfloat16 -- x
    and the widened weights rounded to bf16, fp32 sums, VDPBF16PS -- where the CPU has bf16
    dot products (the avx512bf16 variant; ~1.9x its fp32 prefill GEMM) and --dtype is auto;
    fp32 elsewhere, and under an explicit --dtype float32 (asked for fp32 math, e.g. for
    token parity with an fp32 reference). An explicit bfloat16 without bf16 dot products
    raises (the CLI refuses it earlier from the CPU flags)."""
    if choice == "bfloat16" and not kern.bf16_prefill:
        raise ValueError(
            f"--quantized-prefill-dtype bfloat16 needs AVX512-BF16 kernels; these are {kern.isa}"
        )
    bf16 = choice == "bfloat16" or (choice == "auto" and kern.bf16_prefill and dtype_flag == "auto")
    why = "bf16 dot products" if kern.bf16_prefill else "no bf16 dot products"
    logger.info(
        "quantized prefill GEMMs: %s (--quantized-prefill-dtype %s, --dtype %s; %s kernels, %s)",
        "bfloat16" if bf16 else "float32", choice, dtype_flag, kern.isa, why,
    )  # fmt: skip
    return bf16
