"""Start-up decisions of an engine: device, dtype and how many KV pages fit in memory."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pdcore.model.config import ModelConfig
from pdcore.model.cpu_flags import cpu_computes_bf16
from pdcore.model.parallel import local_kv_heads
from pdcore.model.quantized import resolve
from pdcore.model.registry import kv_bytes_per_token

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# On a CPU without mem_fraction_static the pool gets this share of available RAM, capped.
_CPU_POOL_SHARE = 0.2
_CPU_POOL_CAP_BYTES = 4 << 30


# On a GPU without mem_fraction_static, weights + KV pool get this share of total memory;
# the rest is for activations, CUDA graphs and other processes' contexts (as in SGLang).
_GPU_MEM_FRACTION = 0.85


def pick_device(name: str, base_gpu_id: int = 0) -> torch.device:
    """cpu, cuda:<base_gpu_id> (made the current device, which Triton launches on), or an
    Ascend NPU: npu:N, or npu:<base_gpu_id> for plain npu (through torch_npu, which
    registers the `npu` device type with torch when imported)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "npu" or name.startswith("npu:"):
        return _pick_npu(name, base_gpu_id)
    if name != "cuda":
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    count = torch.cuda.device_count()
    if base_gpu_id >= count:
        raise ValueError(f"--base-gpu-id {base_gpu_id}: only {count} CUDA device(s) visible")
    device = torch.device("cuda", base_gpu_id)
    torch.cuda.set_device(device)
    return device


def _pick_npu(name: str, base_gpu_id: int) -> torch.device:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and the "npu" device type)
    except ImportError as exc:
        raise ValueError(
            f"--device {name}: torch_npu cannot be imported ({exc}); install Ascend's "
            "torch-npu matching this torch and CANN"
        ) from exc
    npu: Any = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        raise ValueError(f"--device {name}: torch_npu is installed but sees no NPU")
    index = int(name.split(":", 1)[1]) if ":" in name else base_gpu_id
    count = int(npu.device_count())
    if index >= count:
        raise ValueError(f"--device {name}: NPU {index} asked for, only {count} visible")
    device = torch.device("npu", index)
    npu.set_device(device)
    return device


def pick_dtype(name: str, device: torch.device, keeps_quantized: bool = False) -> torch.dtype:
    """auto: the fastest correct compute type -- bf16 where the hardware computes it
    natively, else fp32 on CPU (bf16 there is emulated, ~3x slower than fp32; weights a
    bf16 checkpoint holds stay bf16 in memory and are widened in registers by the GEMM
    kernel, see pdcore.model.linear), fp16 on GPUs without bf16. `keeps_quantized` (the
    linear weights stay quantized on this CPU, see weights_stay_quantized): fp32 on every
    CPU -- the quantized kernels compute in fp32, so bf16 activations would only add
    conversions and rounding, and the one-call decode loop is fp32. The choice is logged."""
    if name != "auto":
        dtype = _DTYPES[name]
        if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_computes_bf16():
            logger.warning(
                "--dtype bfloat16 on a CPU without bf16 arithmetic (no AVX512-BF16/AMX): "
                "torch runs its bf16 ops emulated; --dtype auto (float32) is faster"
            )
        return dtype
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        why = "GPU computes bf16" if dtype == torch.bfloat16 else "GPU lacks bf16"
    elif keeps_quantized:
        dtype, why = torch.float32, "linear weights stay quantized; their kernels compute fp32"
    elif cpu_computes_bf16():
        dtype, why = torch.bfloat16, "CPU computes bf16 (AVX512-BF16/AMX)"
    else:
        dtype = torch.float32
        why = "CPU has no bf16 arithmetic; bf16-exact weights stay bf16 in memory"
    logger.info("dtype auto -> %s (%s)", str(dtype).removeprefix("torch."), why)
    return dtype


def weights_stay_quantized(
    dtype_name: str, method: str, model_source: str, device: torch.device, tp_size: int
) -> bool:
    """Whether --dtype auto meets linear weights kept quantized (--quantization resolving to
    gguf or int8 on this CPU, one rank) -- pick_dtype's `keeps_quantized`. Only asked for
    auto on a CPU with one rank (elsewhere the weights are dequantized or refused later,
    with the error where it always was)."""
    if dtype_name != "auto" or device.type != "cpu" or tp_size > 1 or method == "none":
        return False
    return resolve(method, model_source, device, tp_size)[0] != "none"


def _available_bytes(device: torch.device) -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def weight_bytes(config: ModelConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes the model's weights take on one device, from its shape (before loading it);
    with tensor parallelism, one rank's shard (embeddings replicated on every rank)."""
    h = config.hidden_size
    q = config.num_heads // tp_size
    kv = local_kv_heads(config, tp_size)
    q_size, kv_size = q * config.head_dim, kv * config.head_dim
    inter = config.intermediate_size // tp_size
    per_layer = h * (q_size + 2 * kv_size) + q_size * h + 3 * h * inter
    per_layer += 2 * h + (q_size + 2 * kv_size if config.attention_bias else 0)
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    params = config.num_layers * per_layer + embeddings + h
    return params * torch.tensor([], dtype=dtype).element_size()


def _gpu_kv_budget(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    fraction: float | None,
    tp_size: int = 1,
) -> int:
    """SGLang's rule: weights + KV pool fill `fraction` of the GPU's total memory, counting
    what is already in use (this process's context, other processes) against it."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = _GPU_MEM_FRACTION if fraction is None else fraction
    weights = weight_bytes(config, dtype, tp_size)
    budget = int(total * fraction) - (total - free) - weights
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB total, "
            f"{(total - free) / 2**30:.1f} GiB in use, weights {weights / 2**30:.1f} GiB, "
            f"--mem-fraction-static {fraction}; raise it or use a smaller model"
        )
    return budget


def pool_pages(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    page_size: int,
    max_total_tokens: int | None,
    mem_fraction_static: float | None,
    tp_size: int = 1,
    ranks_per_node: int = 1,
) -> int:
    """Number of pages (including the padding page) for one rank's KV pool. With tensor
    parallelism a rank stores only its KV heads (local_kv_heads), and on a CPU the ranks of
    one node share its memory, so each takes 1/ranks_per_node of the CPU budget."""
    per_token = kv_bytes_per_token(config, dtype, tp_size)  # in the family's KV layout
    if max_total_tokens is not None:
        tokens = max_total_tokens
    else:
        if device.type == "cuda":
            budget = _gpu_kv_budget(config, dtype, device, mem_fraction_static, tp_size)
        elif mem_fraction_static is not None:
            budget = int(_available_bytes(device) * mem_fraction_static) // ranks_per_node
        else:
            budget = min(int(_available_bytes(device) * _CPU_POOL_SHARE), _CPU_POOL_CAP_BYTES)
            budget //= ranks_per_node
        tokens = budget // per_token
    pages = max(tokens // page_size, 1) + 1
    logger.info(
        "KV pool: %d pages of %d tokens (%.1f MiB)",
        pages - 1,
        page_size,
        pages * page_size * per_token / 2**20,
    )
    return pages
