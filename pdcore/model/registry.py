"""Model families, keyed by the `architectures` entry of a Hugging Face config.json.

A family is one module plus one `register(...)` line below. The module exposes four
functions (the `FamilyModule` protocol): read its config, build the model from a state
dict, say how many KV bytes a token takes, and build the KV pool in its layout. The module
is imported only when a model of that family is loaded, so listing or checking families
costs nothing. An unknown architecture fails with the supported ones named, before any
weight is read (at flag parsing where the config can be read there, see
`pdcore.settings.ServerSettings.model_problem`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from pdcore.model.config import ModelConfig

if TYPE_CHECKING:  # torch and the model code load with a family, not with the registry
    import torch

    from pdcore.model.attention import AttentionBackend
    from pdcore.model.forward_batch import ForwardBatch
    from pdcore.model.kv_pool import KVPool
    from pdcore.model.parallel import TPGroup
    from pdcore.model.quantized import QuantizedWeights
    from pdcore.model.rope import RotaryTable


class CausalLM(Protocol):
    """What the engine needs of a built model, whatever its family."""

    device: torch.device
    tp: TPGroup
    num_heads: int  # this rank's query heads
    num_kv_heads: int  # KV "heads" per token the pool stores (1 for MLA's latent)
    rotary: RotaryTable  # its length bounds the positions the engine admits

    def forward(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> torch.Tensor:
        """fp32 logits of the rows in batch.logits_indices (empty on a TP follower)."""
        ...


class FamilyModule(Protocol):
    """The functions a family's module defines."""

    def read_config(self, cfg: dict[str, Any]) -> ModelConfig: ...

    def build_model(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        tp: TPGroup | None,
    ) -> CausalLM: ...

    def kv_bytes_per_token(self, config: ModelConfig, dtype: torch.dtype, tp_size: int) -> int: ...

    def make_kv_pool(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tp_size: int,
    ) -> KVPool: ...


@dataclass(frozen=True)
class ModelFamily:
    architecture: str  # the HF `architectures` entry
    module: str  # imported only when the family is used
    attention: Literal["mha", "mla"]  # the KV pool layout (pdcore.model.kv_pool)
    moe: bool
    model_types: tuple[str, ...] = ()  # config.json model_type / GGUF architecture names
    tensor_parallel: bool = False  # whether --tp-size > 1 is implemented
    uses_attention_backend: bool = True  # False: the model attends itself (MLA, in torch)
    cuda_graphs: bool = True  # False: host-side work per step (MoE grouping) rules them out
    quantized_linear: bool = False  # whether --quantization gguf/int8 is implemented
    # "module:function" reading config.json without torch (pdcore.model.family_configs);
    # empty: the family module's own read_config (which may import torch).
    config_reader: str = ""

    def impl(self) -> FamilyModule:
        return cast("FamilyModule", importlib.import_module(self.module))

    def read_config(self, cfg: dict[str, Any]) -> ModelConfig:
        if not self.config_reader:
            return self.impl().read_config(cfg)
        module, name = self.config_reader.split(":")
        reader: Any = getattr(importlib.import_module(module), name)
        return cast(ModelConfig, reader(cfg))


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> None:
    _FAMILIES[family.architecture] = family


for _arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
    register(
        ModelFamily(
            _arch,
            "pdcore.model.llama_family",
            "mha",
            moe=False,
            model_types=(_arch.removesuffix("ForCausalLM").lower(),)
            + (("smollm",) if _arch == "LlamaForCausalLM" else ()),
            tensor_parallel=True,
            quantized_linear=True,
            config_reader="pdcore.model.family_configs:read_llama_config",
        )
    )
register(
    ModelFamily(
        "DeepseekV3ForCausalLM",
        "pdcore.model.deepseek_v3",
        "mla",
        moe=True,
        model_types=("deepseek_v3",),
        tensor_parallel=True,
        uses_attention_backend=False,
        cuda_graphs=False,
        config_reader="pdcore.model.family_configs:read_deepseek_v3_config",
    )
)
register(
    ModelFamily(
        "Qwen3MoeForCausalLM",
        "pdcore.model.qwen3_moe",
        "mha",
        moe=True,
        model_types=("qwen3_moe",),
        tensor_parallel=True,
        cuda_graphs=False,
        config_reader="pdcore.model.family_configs:read_qwen3_moe_config",
    )
)


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def families() -> list[ModelFamily]:
    return [_FAMILIES[a] for a in supported_architectures()]


def _by_model_type(model_type: str) -> ModelFamily | None:
    return next((f for f in _FAMILIES.values() if model_type in f.model_types), None)


def _unsupported(what: str, where: str) -> ValueError:
    return ValueError(
        f"unsupported architecture {what}{where}; supported: {', '.join(supported_architectures())}"
    )


def family_for(config: ModelConfig) -> ModelFamily:
    """The family of a config read by `config_from_hf` or from GGUF metadata."""
    family = _FAMILIES.get(config.hf_architecture) or _by_model_type(config.architecture)
    if family is None:
        raise _unsupported(repr(config.hf_architecture or config.architecture), "")
    return family


def family_of_hf(cfg: dict[str, Any], where: str = "") -> ModelFamily:
    """The family a parsed config.json names: its `architectures[0]`, or for configs
    without that field, its model_type."""
    archs = cfg.get("architectures") or []
    if archs:
        family = _FAMILIES.get(str(archs[0]))
        if family is None:
            raise _unsupported(repr(archs[0]), where)
        return family
    model_type = str(cfg.get("model_type", "llama")).lower()
    family = _by_model_type(model_type)
    if family is None:
        raise _unsupported(f"(model_type {model_type!r})", where)
    return family


def config_from_hf(path: Path) -> ModelConfig:
    """Read an HF config.json through its family's reader (ValueError when unsupported)."""
    cfg = json.loads(path.read_text())
    return family_of_hf(cfg, f" in {path}").read_config(cfg)


def check_parallel(config: ModelConfig, tp_size: int) -> None:
    """ValueError when the family cannot run over `tp_size` ranks yet."""
    family = family_for(config)
    if tp_size > 1 and not family.tensor_parallel:
        raise ValueError(
            f"{family.architecture} does not run with tensor parallelism yet (tp size "
            f"{tp_size}); run it with --tp-size 1 (--dp-size replicates it)"
        )


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPGroup | None = None,
    quant: QuantizedWeights | None = None,
    ep_size: int = 1,
    ep_group: TPGroup | None = None,
) -> CausalLM:
    """Build `config`'s family's model from HF-named weights (this rank's share); `quant`:
    linear weights kept quantized (--quantization), for families with `quantized_linear`;
    `ep_size`: expert parallelism over the TP group (MoE families); `ep_group`
    (--enable-dp-attention): experts split over that group, every rank a batch of its own."""
    from pdcore.model.moe import check_ep, num_routed_experts

    check_parallel(config, tp.size if tp else 1)
    family = family_for(config)
    if ep_group is not None:
        if quant is not None or num_routed_experts(config) == 0:
            raise ValueError(
                f"--enable-dp-attention needs a mixture-of-experts model without "
                f"--quantization; {family.architecture} is not one"
            )
        build = family.impl().build_model
        return build(config, state, dtype, device, max_positions, tp, ep_group=ep_group)  # type: ignore[call-arg]
    check_ep(config, tp.size if tp else 1, ep_size)
    if quant is None:
        build = family.impl().build_model
        if ep_size > 1:  # only MoE families take it (check_ep refuses it for the others)
            return build(config, state, dtype, device, max_positions, tp, ep_size=ep_size)  # type: ignore[call-arg]
        return build(config, state, dtype, device, max_positions, tp)
    if not family.quantized_linear:
        raise ValueError(
            f"--quantization {quant.method}: {family.architecture} has no quantized layers yet; "
            "use --quantization none"
        )
    build = family.impl().build_model
    return build(config, state, dtype, device, max_positions, tp, quant=quant)  # type: ignore[call-arg]


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
    """KV cache bytes one token takes on one rank, all layers, in the family's layout."""
    return family_for(config).impl().kv_bytes_per_token(config, dtype, tp_size)


def make_kv_pool(
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    tp_size: int = 1,
) -> KVPool:
    """The KV pool in the family's layout ("mha": KVPool, "mla": MLAKVPool)."""
    impl = family_for(config).impl()
    return impl.make_kv_pool(config, num_pages, page_size, dtype, device, tp_size)
