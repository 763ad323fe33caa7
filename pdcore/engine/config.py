"""The engine's own settings: exactly the fields an `EngineCore` reads, typed.

The CLI's `ServerSettings` (pdcore.settings) has many more (HTTP, router, PD) and sits
above the engine; it hands the engine an `EngineConfig` built by `engine_config()`, so the
engine never depends on the settings of the layers that drive it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdcore.profiling import ProfileSettings

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = str
"""auto, cpu, cuda, npu or npu:N (validated by the CLI settings; see pick_device)."""


@dataclass(frozen=True)
class EngineConfig:
    """Model, KV pool, scheduler and kernel choices of one engine (see `pdcore serve --help`
    for what each means; the names are the flags' names)."""

    model_path: str | None = None
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    dtype: DType = "auto"
    quantization: str = "auto"
    """auto, none, gguf, int8 or w8a16 (see pdcore.model.quantized)."""
    gguf_activations: str = "int16"
    """int16 or int8: how the GGUF kernels quantize activations (kernels/quant_gemm.c)."""
    quantized_prefill_dtype: str = "auto"
    """auto, float32 or bfloat16: what the quantized layers' prefill GEMMs multiply in."""
    device: Device = "auto"
    base_gpu_id: int = 0
    page_size: int = 16
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    context_length: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int = 2048
    schedule_policy: str = "fcfs"
    attention_backend: str = "torch"
    disable_radix_cache: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 64
    random_seed: int | None = None
    cpu_threads: int | None = None
    tp_size: int = 1
    """Tensor-parallel ranks (the TP group itself is handed to EngineCore)."""
    pp_size: int = 1
    """Pipeline stages (the stage group itself is handed to EngineCore)."""
    ep_size: int = 1
    """Expert-parallel ranks of an MoE model: 1, or the TP group (--ep-size == --tp-size)."""
    dp_size: int = 1
    """Data-parallel replicas (each an EngineCore of its own)."""
    enable_dp_attention: bool = False
    """Each dp replica attends alone (TP size tp_size / dp_size) while the MoE layers split
    their experts over all tp_size ranks (the EP group is handed to EngineCore)."""
    tp_ranks_per_node: int = 1
    """TP ranks sharing this node's memory (the CPU pool budget is split between them)."""
    profile: ProfileSettings | None = None
    """Which phases to profile (None: none)."""
