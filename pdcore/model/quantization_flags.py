"""`--quantization`'s values and the flag check that runs before any weight loads.

Apart from pdcore.model.quantized (torch, the kernels) because `pdcore serve` checks its
flags in the HTTP frontend, which never imports torch.
"""

from __future__ import annotations

from pdcore.model.cpu_flags import cpu_features, forced_variant, kernels_disabled

METHODS = ("auto", "none", "gguf", "int8", "w8a16")
GGUF_ACTIVATION_PARTS = {"int16": 2, "int8": 1}
"""--gguf-activations: int8 parts per activation in the GGUF kernels (kernels/quant_gemm.c)."""
PREFILL_DTYPES = ("auto", "float32", "bfloat16")
"""--quantized-prefill-dtype: what the quantized layers' prefill GEMMs multiply in."""


def is_gguf(model_path: str | None) -> bool:
    return model_path is None or str(model_path).endswith(".gguf")  # None: the default GGUF


def quantization_problem(
    method: str, model_path: str | None, device: str, tp_size: int
) -> str | None:
    """Why `--quantization method` cannot work with these flags (checked before any weights
    load), or None."""
    if method not in METHODS:
        return f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
    if method in ("auto", "none"):
        return None
    if method == "gguf" and not is_gguf(model_path):
        return (
            f"gguf needs a .gguf model file; {model_path} is a folder of dense weights "
            "(use int8 to quantize it at load, or none)"
        )
    if device not in ("auto", "cpu"):
        return f"{method}: quantized weights run on CPU only (--device {device}); use none"
    if tp_size > 1:
        return f"{method}: not supported with --tp-size > 1 yet; use none"
    return None


def gguf_activations_problem(
    choice: str, method: str, model_path: str | None, device: str, tp_size: int
) -> str | None:
    """Why `--gguf-activations choice` would be ignored with these flags, or None: it only
    acts on GGUF blocks kept as shipped, i.e. a .gguf model with --quantization auto or gguf
    on a CPU with one rank (the default int16 is accepted everywhere; a CPU without
    pdcore's kernels is only known at load, which logs it)."""
    if choice not in GGUF_ACTIVATION_PARTS:
        return f"unknown value {choice!r}; choose one of {', '.join(GGUF_ACTIVATION_PARTS)}"
    if choice == "int16":
        return None
    if method not in ("auto", "gguf"):
        return f"{choice} applies to GGUF weights kept as shipped, not --quantization {method}"
    if not is_gguf(model_path):
        return f"{choice} applies to a .gguf model; {model_path} is not one"
    if device not in ("auto", "cpu") or tp_size > 1:
        return f"{choice}: GGUF weights are kept as shipped on a CPU with one rank only"
    return None


def quantized_prefill_dtype_problem(
    choice: str, method: str, model_path: str | None, device: str, tp_size: int
) -> str | None:
    """Why `--quantized-prefill-dtype choice` would be ignored or emulated with these flags,
    or None. It acts only on weights kept quantized (a CPU, one rank; a GGUF or --quantization
    int8), and bfloat16 only where the CPU has bf16 dot products (AVX512-BF16): pdcore never
    runs emulated bf16 GEMMs."""
    if choice not in PREFILL_DTYPES:
        return f"unknown value {choice!r}; choose one of {', '.join(PREFILL_DTYPES)}"
    if choice == "auto":
        return None
    if method == "none" or (method == "auto" and not is_gguf(model_path)):
        return f"{choice} applies to quantized weights; with --quantization {method} none are"
    if device not in ("auto", "cpu") or tp_size > 1:
        return f"{choice}: quantized weights are kept on a CPU with one rank only"
    if choice == "bfloat16" and "avx512_bf16" not in cpu_features():
        return (
            "bfloat16 needs bf16 dot products (AVX512-BF16); this CPU lacks avx512_bf16 "
            "and would emulate them (auto picks float32 here)"
        )
    if choice == "bfloat16" and kernels_disabled():
        return "bfloat16 needs pdcore's CPU kernels; PDCORE_DISABLE_NATIVE_KERNELS turns them off"
    forced = forced_variant()
    if choice == "bfloat16" and forced not in ("", "avx512bf16"):
        return f"bfloat16 needs the avx512bf16 kernels; PDCORE_CPU_ISA={forced} forces others"
    return None
