"""Our CPU kernels for bf16 and fp32 models (`kernels/*.c`: skinny GEMM, RMSNorm fused
with the residual add, SiLU-and-mul, RoPE, paged decode attention), compiled once per machine.

Why compiled at first use rather than at install: the kernel needs AVX512-BF16, which only
the machine that runs it can vouch for, and a plain C file built by the system compiler
needs neither torch's headers nor a build step in `pip install`. The shared object is cached
under the pdcore cache directory (keyed by the source's hash) and called through ctypes.
Anything missing (no AVX512-BF16, no C compiler, a failed build) means `load()` returns
None and callers keep the torch/oneDNN/MKL path: a speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache, lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).with_name("kernels")).glob("bf16_*.c"))
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
MAX_ROWS = 32
"""Above this many rows (prefill), the libraries' blocked GEMMs are as fast or faster."""


def _cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags


def _cache_dir() -> Path:
    base = os.environ.get("PDCORE_CACHE_DIR") or Path.home() / ".cache" / "pdcore"
    return Path(base) / "kernels"


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        cmd = [cc, *CFLAGS, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(tmp_path)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        tmp_path.replace(out)  # atomic: concurrent first starts never load a half-written file
    finally:
        tmp_path.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None when this machine cannot use it (and why, in the log)."""
    if os.environ.get("PDCORE_DISABLE_NATIVE_KERNELS", "") not in ("", "0"):
        return None
    if not _cpu_has_avx512_bf16():
        return None
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for src in sorted(SOURCES[0].parent.glob("bf16_*")):  # the .c files and their header
        h.update(src.read_bytes())
    path = _cache_dir() / f"pdcore_bf16_kernels-{h.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))  # torch is imported: its libgomp is the one reused
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("native CPU kernels unavailable (%s) %s", exc, detail.decode()[-500:])
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for kind in ("bf16", "f32"):
        _declare(
            getattr(lib, f"pdcore_{kind}_skinny_gemm"), [p, i64, i64, p, p, i64, i64, p, i64, i32]
        )
        _declare(getattr(lib, f"pdcore_{kind}_rms_norm"), [p, p, p, p, *[i64] * 5, f32])
        _declare(getattr(lib, f"pdcore_{kind}_silu_mul"), [p, p, i64, i64, i64, i64])
        _declare(getattr(lib, f"pdcore_{kind}_rope"), [p, i64, i64, i64, i64, p, p, p])
        attn = [p, i64, p, i64, p, i64, p, p, p, i64, p, p, i64, i64, i64, i64, f32, p, i32]
        _declare(getattr(lib, f"pdcore_{kind}_decode_attention"), attn)
    return lib


def _declare(fn: ctypes._CFuncPtr, argtypes: list) -> None:
    fn.restype = None
    fn.argtypes = argtypes


def can_pack(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return weight.dtype in (torch.bfloat16, torch.float32) and n % 16 == 0 and k % 16 == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K, 16]: 16 output features at one k per 32 (bf16) or 64 (fp32) bytes."""
    n, k = weight.shape
    return weight.reshape(n // 16, 16, k).permute(0, 2, 1).contiguous()


class Kernels:
    """The kernels for one element type (bf16 or fp32), looked up once: callers keep one of
    these (`kernels(dtype)`) and call it per layer without any per-call dispatch."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype) -> None:
        kind = "f32" if dtype == torch.float32 else "bf16"
        self.dtype = dtype
        self._gemm = getattr(lib, f"pdcore_{kind}_skinny_gemm")
        self._rms_norm = getattr(lib, f"pdcore_{kind}_rms_norm")
        self._silu_mul = getattr(lib, f"pdcore_{kind}_silu_mul")
        self._rope = getattr(lib, f"pdcore_{kind}_rope")
        self._attention = getattr(lib, f"pdcore_{kind}_decode_attention")

    def gemm(
        self, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [M, K] (rows may be strided) @ W.T (+ bias, added before the one rounding, as
        F.linear does) -> [M, N]; `packed` comes from `pack(W)`."""
        m, k = x.shape
        if x.stride(1) != 1:
            x = x.contiguous()
        y = torch.empty((m, n), dtype=x.dtype)
        self._gemm(
            x.data_ptr(), m, x.stride(0), packed.data_ptr(),
            0 if bias is None else bias.data_ptr(), n, k, y.data_ptr(), n,
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RMSNorm of x's rows (hidden % 16 == 0). With `delta`, x += delta first, in place:
        the residual add and the next norm in one pass."""
        rows, h = x.shape
        out = torch.empty((rows, h), dtype=x.dtype)
        self._rms_norm(
            x.data_ptr(), 0 if delta is None else delta.data_ptr(), weight.data_ptr(),
            out.data_ptr(), rows, h, x.stride(0), 0 if delta is None else delta.stride(0), h,
            eps,
        )  # fmt: skip
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] per row (contiguous rows)."""
        rows, two_i = gate_up.shape
        i = two_i // 2
        out = torch.empty((rows, i), dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, i, gate_up.stride(0), i)
        return out

    def rope_(
        self,
        qkv: torch.Tensor,
        heads: int,
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Rotary embedding in place on the first `heads` heads of each qkv row (q then k
        heads, as the fused projection lays them out); cos/sin are [max_pos, head_dim]. The
        caller guarantees positions < max_pos (the C side does not check)."""
        self._rope(
            qkv.data_ptr(), qkv.shape[0], qkv.stride(0), heads, head_dim, cos.data_ptr(),
            sin.data_ptr(), positions.data_ptr(),
        )  # fmt: skip

    def decode_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        out_slots: torch.Tensor,
        lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One decode step's attention for every sequence, straight from the page pool.

        q [B, H, D], k/v [B, KVH, D] (rows may be strided, heads packed); k_cache/v_cache
        the layer's flat [slots, KVH, D] pool (the new k/v rows are written into it here);
        slots [B, max_len] int64; out_slots [B] int64 (where the new rows go); lens [B]
        int64. Returns [B, H * D].
        """
        b, h, d = q.shape
        kvh = k.shape[1]
        q, k, v = (
            t if t.stride(2) == 1 and t.stride(1) == d else t.contiguous() for t in (q, k, v)
        )
        out = torch.empty((b, h * d), dtype=q.dtype)
        self._attention(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), slots.shape[1],
            out_slots.data_ptr(), lens.data_ptr(), b, h, kvh, d, scale, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out


@cache
def kernels(dtype: torch.dtype) -> Kernels | None:
    """The kernels for `dtype` (bf16 or fp32), or None where they cannot run here."""
    if dtype not in (torch.bfloat16, torch.float32):
        return None
    lib = load()
    return None if lib is None else Kernels(lib, dtype)


def decode_attention_applies(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Shapes the kernel handles (its register tiles are sized for head_dim <= 256)."""
    return head_dim % 32 == 0 and head_dim <= 256 and num_heads % num_kv_heads == 0
