"""The paged KV cache: per layer, K and V shaped [num_pages, page_size, kv_heads, head_dim].

One page of one layer is one contiguous byte range, so a request's KV moves between
instances as a short list of (src, dst, len) runs (DESIGN.md §4).

Two layouts: "mha" (`KVPool`, per-head K and V: Llama, Qwen3-MoE) and "mla" (`MLAKVPool`,
DeepSeek's multi-head latent attention: one buffer per layer holding, per token, the
compressed latent and the shared RoPE key -- one "head" of kv_lora_rank + rope_dim).
"""

from __future__ import annotations

import torch


class KVPool:
    """Storage only; which page belongs to whom is the PageAllocator's business."""

    layout = "mha"

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        # torch.empty: untouched pages cost no RAM; page 0 is the zeroed padding page that
        # masked-out gather positions point at, so no garbage (NaN) ever enters attention.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype

    def k_flat(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K as [num_pages * page_size, kv_heads, head_dim] (a view)."""
        return self.k[layer].view(-1, *self.k.shape[-2:])

    def v_flat(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(-1, *self.v.shape[-2:])

    @property
    def page_bytes_per_layer(self) -> int:
        """Bytes of one page of K (or V) in one layer: the unit a transfer moves."""
        return self.k[0, 0].numel() * self.k.element_size()

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        )

    def buffers(self) -> list[torch.Tensor]:
        """The tensors a transfer registers, each [num_layers, num_pages, ...]: K and V."""
        return [self.k, self.v]


class MLAKVPool(KVPool):
    """MLA's compressed cache: one tensor [num_layers, num_pages, page_size, 1,
    kv_lora_rank + rope_dim], the latent first, then the RoPE'd shared key.

    `k` is that one buffer (so `k_flat` and the page arithmetic read the same way as for
    "mha"); there is no V -- the latent is the value too. A page of a layer is
    page_size * (kv_lora_rank + rope_dim) * dtype size bytes, one run per layer.
    """

    layout = "mla"

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_pages, page_size, 1, kv_lora_rank + rope_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()  # the padding page, as in KVPool
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim

    def v_flat(self, layer: int) -> torch.Tensor:
        raise TypeError("an MLA pool has no separate V: the latent in k_flat() is the value")

    def buffers(self) -> list[torch.Tensor]:
        return [self.k]

    @staticmethod
    def mla_bytes_per_token(
        num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * (kv_lora_rank + rope_dim) * torch.tensor([], dtype=dtype).element_size()
