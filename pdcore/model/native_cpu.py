"""Our CPU kernels for bf16 and fp32 models (`kernels/*.c`: skinny GEMM, RMSNorm fused
with the residual add, SiLU-and-mul, RoPE, paged decode attention, and the GEMM over
quantized weights -- GGUF Q4_0/Q4_1/Q8_0 blocks, int8 per channel), compiled once per machine.

One C source for every CPU: the kernels are written with GCC's vector extensions
(`kernels/vec.h`) and built per ISA variant -- x86-64-v3 (AVX2+FMA), x86-64-v4 (AVX512F),
x86-64-v4 + AVX512-BF16, ARM64 NEON -- each with its own flags, so the compiler picks the
vector width and instructions. At first use the best variant this CPU supports (its
/proc/cpuinfo flags) is compiled by the system C compiler, cached under the pdcore cache
directory (keyed by variant, flags and the sources' hash) and called through ctypes.

Why compiled at first use rather than at install: only the machine that runs the kernels can
vouch for its ISA, and a plain C file built by the system compiler needs neither torch's
headers nor a build step in `pip install`. Anything missing (no supported ISA, no C
compiler, a failed build, PDCORE_DISABLE_NATIVE_KERNELS=1) means `load()` returns None, the
reason is logged, and callers keep the torch/oneDNN/MKL path: a speed-up, never a
requirement. PDCORE_CPU_ISA=<variant> forces one variant (tests run each one the CPU has).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from pdcore.model.cpu_flags import cpu_features, forced_variant, kernels_disabled

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
SOURCES = sorted(KERNEL_DIR.glob("*.c"))
MAX_ROWS = 32
"""Above this many rows (prefill), the libraries' blocked GEMMs are as fast or faster."""

# x86-64-v3 / v4 as the psABI defines them, in /proc/cpuinfo's spelling ("abm" = LZCNT).
_X86_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "xsave"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: compiler flags and the CPU features they need."""

    name: str
    arch: str  # platform.machine() of the CPUs it runs on
    cflags: tuple[str, ...]
    needs: frozenset[str]
    native_bf16: bool  # the CPU computes bf16 itself (no emulation in torch's bf16 GEMMs)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (  # in order of preference
        Variant(
            "avx512bf16", "x86_64", ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"),
            _X86_V4 | {"avx512_bf16", "avx512_vnni"}, True,
        ),
        Variant("avx512", "x86_64", ("-march=x86-64-v4",), _X86_V4, False),
        Variant("avx2", "x86_64", ("-march=x86-64-v3",), _X86_V3, False),
        Variant("neon", "aarch64", ("-march=armv8-a",), frozenset({"asimd"}), False),
    )
}  # fmt: skip
_COMMON_FLAGS = ("-O3", "-fPIC", "-fopenmp", "-Wall")
# a*b+c contracted to one FMA in the GEMM and attention; elementwise ops round as torch does
_FILE_FLAGS = {"elementwise.c": ("-ffp-contract=off",)}


def supported_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    machine, feats = platform.machine().lower(), cpu_features()
    machine = {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)
    return [v.name for v in VARIANTS.values() if v.arch == machine and v.needs <= feats]


def pick_variant() -> tuple[str | None, str]:
    """The variant to load and why (or None and why not)."""
    if kernels_disabled():
        return None, "disabled by PDCORE_DISABLE_NATIVE_KERNELS"
    supported = supported_variants()
    forced = forced_variant()
    if forced:
        if forced not in VARIANTS:
            return None, f"PDCORE_CPU_ISA={forced!r} is none of {', '.join(VARIANTS)}"
        if forced not in supported:
            return None, f"PDCORE_CPU_ISA={forced}: this CPU lacks {_missing(forced)}"
        return forced, "forced by PDCORE_CPU_ISA"
    if not supported:
        return (
            None,
            f"no kernel variant for this CPU ({platform.machine()}, needs AVX2+FMA, AVX512 or NEON)",
        )
    return supported[0], "best variant this CPU supports"


def _missing(name: str) -> str:
    v = VARIANTS[name]
    lacking = sorted(v.needs - cpu_features())
    if platform.machine().lower() not in (v.arch, {"x86_64": "amd64", "aarch64": "arm64"}[v.arch]):
        lacking.insert(0, f"arch {v.arch}")
    return ", ".join(lacking) or "nothing"


def _cache_dir() -> Path:
    base = os.environ.get("PDCORE_CACHE_DIR") or Path.home() / ".cache" / "pdcore"
    return Path(base) / "kernels"


def compile_variant(
    name: str, out: Path, cc: str | None = None, extra_flags: tuple[str, ...] = ()
) -> None:
    """Build variant `name` into the shared object `out` (atomically) with `cc` (default:
    $CC, cc or gcc). Raises RuntimeError or CalledProcessError (its stderr says why).
    `extra_flags` is for tests (e.g. `-DPDCORE_VW=16`: the 16-lane code on an AVX2 CPU)."""
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    flags = [*_COMMON_FLAGS, *VARIANTS[name].cflags, *extra_flags]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = []
        for src in SOURCES:  # one object per file: per-file flags (fp contraction)
            obj = Path(tmp) / (src.stem + ".o")
            cmd = [cc, *flags, *_FILE_FLAGS.get(src.name, ()), "-c", str(src), "-o", str(obj)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=180)
            objs.append(str(obj))
        tmp_so = Path(tmp) / "kernels.so"
        cmd = [cc, *flags, "-shared", *objs, "-o", str(tmp_so)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        tmp_so.replace(out)  # atomic: concurrent first starts never load a half-written file


def _so_path(name: str) -> Path:
    h = hashlib.sha256(
        " ".join([*_COMMON_FLAGS, *VARIANTS[name].cflags, str(_FILE_FLAGS)]).encode()
    )
    for src in sorted(KERNEL_DIR.iterdir()):  # the .c files and their header
        if src.suffix in (".c", ".h"):
            h.update(src.name.encode() + src.read_bytes())
    return _cache_dir() / f"pdcore_kernels-{name}-{h.hexdigest()[:16]}.so"


def load(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels -- variant `isa`, or the one `pick_variant()` names -- or None
    when this machine cannot use them (and why, in the log)."""
    return _load(isa)


@cache
def _load(isa: str | None) -> ctypes.CDLL | None:
    if isa is None:
        isa, why = pick_variant()
        if isa is None:
            logger.info("native CPU kernels off: %s", why)
            return None
        return _load(isa)
    if isa not in supported_variants():
        logger.info("native CPU kernels %s off: this CPU lacks %s", isa, _missing(isa))
        return None
    path = _so_path(isa)
    try:
        if not path.exists():
            compile_variant(isa, path)
        lib = ctypes.CDLL(str(path))  # torch is imported: its libgomp is the one reused
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("native CPU kernels unavailable (%s) %s", exc, detail.decode()[-500:])
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    gemm = [p, i64, i64, p, p, i64, i64, p, i64, i32]
    _declare(lib.pdcore_f32_bf16w_skinny_gemm, gemm)
    for kind in ("bf16", "f32"):
        _declare(getattr(lib, f"pdcore_{kind}_skinny_gemm"), gemm)
        _declare(getattr(lib, f"pdcore_{kind}_rms_norm"), [p, p, p, p, *[i64] * 5, f32])
        _declare(getattr(lib, f"pdcore_{kind}_silu_mul"), [p, p, i64, i64, i64, i64])
        _declare(getattr(lib, f"pdcore_{kind}_rope"), [p, i64, i64, i64, i64, p, p, p])
        attn = [p, i64, p, i64, p, i64, p, p, p, i64, p, p, i64, i64, i64, i64, f32, p, i32]
        _declare(getattr(lib, f"pdcore_{kind}_decode_attention"), attn)
        extend = [p, i64, p, p, p, p, i64, i64, i64, i64, f32, p, i32]
        _declare(getattr(lib, f"pdcore_{kind}_extend_attention"), extend)
    _declare(lib.pdcore_quant_gemm, [p, i64, i64, p, i32, i32, i32, p, i64, i64, p, i64, i32])
    _declare(lib.pdcore_quant_dequantize, [p, i32, i64, i64, p, i32])
    layers = [p, i64, i64, p, i64, p, p, p, p, i64, p, p, *[i64] * 3, f32, f32, *[p] * 8, i32]
    _declare(lib.pdcore_f32_decode_layers, layers)
    lib.pdcore_isa = isa  # type: ignore[attr-defined]
    logger.info("native CPU kernels: %s", isa)
    return lib


def _declare(fn: Any, argtypes: list[Any]) -> None:
    fn.restype = None
    fn.argtypes = argtypes


def describe() -> str:
    """One line for the start-up log: the variant in use, or why none is."""
    isa, why = pick_variant()
    if isa is not None and load() is None:
        return f"off ({isa} failed to build or load; see the warning above)"
    return f"on ({isa}: {why})" if isa else f"off ({why}); torch path"


def can_pack(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float32)


def pack(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K, 16] (the last block zero-padded), in `dtype` (default: the
    weight's): 16 output features at one k per 32 (bf16) or 64 (fp32) bytes."""
    n, k = weight.shape
    w = weight.to(dtype) if dtype is not None else weight
    if n % 16:
        w = torch.cat([w, w.new_zeros(16 - n % 16, k)])
    return w.reshape(-1, 16, k).permute(0, 2, 1).contiguous()


class CLinear(ctypes.Structure):
    """kernels/decode_layers.c's pd_linear: one linear layer's packed weights."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("kind", ctypes.c_int32),  # 0 quantized, 1 fp32 packed, 2 bf16 packed
        ("fmt", ctypes.c_int32),
        ("act_parts", ctypes.c_int32),
        ("pad", ctypes.c_int32),
    ]


class CLayer(ctypes.Structure):
    """kernels/decode_layers.c's pd_layer: one layer's norms, linears and KV cache."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("qkv", CLinear),
        ("o", CLinear),
        ("gate_up", CLinear),
        ("down", CLinear),
    ]


class Kernels:
    """The kernels for one element type (bf16 or fp32), looked up once: callers keep one of
    these (`kernels(dtype)`) and call it per layer without any per-call dispatch."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype) -> None:
        kind = "f32" if dtype == torch.float32 else "bf16"
        self.dtype = dtype
        self.isa: str = str(lib.pdcore_isa)
        self._gemm = getattr(lib, f"pdcore_{kind}_skinny_gemm")
        self._gemm_bf16w = lib.pdcore_f32_bf16w_skinny_gemm if kind == "f32" else self._gemm
        self._rms_norm = getattr(lib, f"pdcore_{kind}_rms_norm")
        self._silu_mul = getattr(lib, f"pdcore_{kind}_silu_mul")
        self._rope = getattr(lib, f"pdcore_{kind}_rope")
        self._attention = getattr(lib, f"pdcore_{kind}_decode_attention")
        self._extend_attention = getattr(lib, f"pdcore_{kind}_extend_attention")
        self._quant_gemm = lib.pdcore_quant_gemm
        self.decode_layers_fn = lib.pdcore_f32_decode_layers  # fp32 only; see llama.py
        self._quant_dequantize = lib.pdcore_quant_dequantize
        # the variant whose prefill GEMM can multiply in bf16 (VDPBF16PS): AVX512-BF16
        self.bf16_prefill: bool = self.isa == "avx512bf16"

    def quant_gemm(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        fmt: int,
        n: int,
        k: int,
        bias: torch.Tensor | None = None,
        act_parts: int = 2,
        out: torch.Tensor | None = None,
        prefill_bf16: bool = False,
    ) -> torch.Tensor:
        """fp32 x [M, K] (rows may be strided) @ W.T (+ fp32 bias) -> fp32 [M, N], W held
        quantized in `packed` (format `fmt`; see pdcore/model/quantized.py); GGUF formats
        quantize x per 32-k block to `act_parts` int8 parts (1: int8, 2: ~int16). `out`: a
        contiguous fp32 [M, N] to write into (else a new one). `prefill_bf16`: above 32
        rows, x and the weights rounded to bf16 with fp32 sums (only where
        `bf16_prefill` is true; elsewhere fp32 regardless)."""
        m = x.shape[0]
        if x.stride(1) != 1:
            x = x.contiguous()
        y = torch.empty((m, n), dtype=torch.float32) if out is None else out
        self._quant_gemm(
            x.data_ptr(), m, x.stride(0), packed.data_ptr(), fmt, act_parts, int(prefill_bf16),
            0 if bias is None else bias.data_ptr(), n, k, y.data_ptr(), n,
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    def quant_dequantize(self, packed: torch.Tensor, fmt: int, n: int, k: int) -> torch.Tensor:
        """The quantized weights widened to fp32 [N, K]: a transposed view of a contiguous
        [K, N] (the kernel writes whole panels of 16 features with vector stores that way)."""
        wt = torch.empty((k, n), dtype=torch.float32)
        self._quant_dequantize(packed.data_ptr(), fmt, n, k, wt.data_ptr(), torch.get_num_threads())
        return wt.t()

    def gemm(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        n: int,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [M, K] (rows may be strided) @ W.T (+ bias, added before the one rounding, as
        F.linear does) -> [M, N]; `packed` comes from `pack(W)`, in x's dtype or, for fp32
        x, in bf16 (weights widened to fp32 in registers). `out`: a contiguous [M, N] of
        x's dtype to write into (else a new one)."""
        m, k = x.shape
        if x.stride(1) != 1:
            x = x.contiguous()
        y = torch.empty((m, n), dtype=x.dtype) if out is None else out
        fn = self._gemm if packed.dtype == x.dtype else self._gemm_bf16w
        fn(
            x.data_ptr(), m, x.stride(0), packed.data_ptr(),
            0 if bias is None else bias.data_ptr(), n, k, y.data_ptr(), n,
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        delta: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RMSNorm of x's rows (hidden % 16 == 0). With `delta`, x += delta first, in place:
        the residual add and the next norm in one pass. `out`: a contiguous tensor like x to
        write into (else a new one)."""
        rows, h = x.shape
        if out is None:
            out = torch.empty((rows, h), dtype=x.dtype)
        self._rms_norm(
            x.data_ptr(), 0 if delta is None else delta.data_ptr(), weight.data_ptr(),
            out.data_ptr(), rows, h, x.stride(0), 0 if delta is None else delta.stride(0), h,
            eps,
        )  # fmt: skip
        return out

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] per row (contiguous rows); `out`: a
        contiguous [rows, I] to write into (else a new one)."""
        rows, two_i = gate_up.shape
        i = two_i // 2
        if out is None:
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

    def extend_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        seqs: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of a prefill (extend) batch, K/V read from the page pool.

        q [T, H, D] (rows may be strided, heads packed): every sequence's new tokens in
        order; k_cache/v_cache the layer's flat [slots, KVH, D] pool, this batch's rows
        already written; slots: every sequence's token slots (prefix included),
        concatenated, int64; seqs [S, 4] int64: first row in q, new tokens, length, offset
        in `slots`. Returns [T, H * D].
        """
        t, h, d = q.shape
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        out = torch.empty((t, h * d), dtype=q.dtype)
        self._extend_attention(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
            seqs.data_ptr(), seqs.shape[0], h, k_cache.shape[1], d, scale, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out


@cache
def kernels(dtype: torch.dtype, isa: str | None = None) -> Kernels | None:
    """The kernels for `dtype` (bf16 or fp32) -- variant `isa`, default the one picked for
    this CPU -- or None where they cannot run here."""
    if dtype not in (torch.bfloat16, torch.float32):
        return None
    lib = load(isa)
    return None if lib is None else Kernels(lib, dtype)


def decode_attention_applies(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Shapes the kernel handles (d % 32 == 0; its scratch is sized for head_dim <= 256)."""
    return head_dim % 32 == 0 and head_dim <= 256 and num_heads % num_kv_heads == 0
