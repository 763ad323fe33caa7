"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

Plain tensors and functional ops instead of nn.Module trees: the decode step on a CPU is
dominated by per-op overhead, so q/k/v and gate/up are fused into single matmuls at load.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pdcore.model import native_cpu
from pdcore.model.attention import C_DECODE_ATTENTION, AttentionBackend
from pdcore.model.config import ModelConfig
from pdcore.model.decode_layers import DecodeLayers
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.huge_pages import linears_to_huge_pages, thp_unavailable
from pdcore.model.kv_pool import KVPool
from pdcore.model.linear import Linear
from pdcore.model.parallel import HeadShard, TPGroup
from pdcore.model.quantized import QuantizedWeights, QuantLinear
from pdcore.model.rope import RotaryTable, apply_rotary

logger = logging.getLogger(__name__)


class _Layer:
    __slots__ = ("input_norm", "qkv", "o_proj", "post_norm", "gate_up", "down")

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        prefix: str,
        to,
        shard: HeadShard,
        head_dim: int,
        quant: QuantizedWeights | None = None,
    ) -> None:
        attn = prefix + "self_attn."
        self.input_norm = to(state[prefix + "input_layernorm.weight"])
        # Tensor parallel (Megatron): q/k/v and gate/up keep this rank's output rows (its
        # heads, its MLP channels), o_proj and down its input columns; with one rank the
        # slices are the whole tensors.
        q_rows = (shard.head_start * head_dim, shard.num_heads * head_dim)
        kv_rows = (shard.kv_head_start * head_dim, shard.num_kv_heads * head_dim)
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        bias_names = [attn + f"{p}_proj.bias" for p in "qkv"]
        qkv_bias = (
            to(torch.cat([state[n].narrow(0, *rows[p]) for p, n in zip("qkv", bias_names)]))
            if bias_names[0] in state
            else None
        )

        def linear(names: list[str], dense, bias: torch.Tensor | None = None):
            # quantized weights are whole tensors (no TP: quantized.resolve refuses it)
            made = quant.linear(names, state, bias) if quant is not None else None
            return made if made is not None else Linear(to(dense()), bias)

        self.qkv = linear(
            [attn + f"{p}_proj.weight" for p in "qkv"],
            lambda: torch.cat(
                [state[attn + f"{p}_proj.weight"].narrow(0, *rows[p]) for p in "qkv"]
            ),
            qkv_bias,
        )
        self.o_proj = linear(
            [attn + "o_proj.weight"], lambda: state[attn + "o_proj.weight"].narrow(1, *q_rows)
        )
        self.post_norm = to(state[prefix + "post_attention_layernorm.weight"])
        mlp = prefix + "mlp."
        channels = (shard.intermediate_start, shard.intermediate)
        self.gate_up = linear(
            [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
            lambda: torch.cat(
                [state[mlp + f"{p}_proj.weight"].narrow(0, *channels) for p in ("gate", "up")]
            ),
        )
        self.down = linear(
            [mlp + "down_proj.weight"],
            lambda: state[mlp + "down_proj.weight"].narrow(1, *channels),
        )


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        tp: TPGroup | None = None,
        quant: QuantizedWeights | None = None,
        layer_range: range | None = None,
    ) -> None:
        """`layer_range`: with pipeline parallelism, the global layers this stage holds
        (pdcore.model.pipeline_split); its KV pool then has just those, indexed from 0.
        `tp`: this rank's place in a tensor-parallel group; it then holds its shard of
        the attention and MLP weights (llama.py's _Layer) and sums the row-parallel outputs
        over the group. Embedding and LM head are replicated; only the driver (rank 0)
        computes logits. `quant`: linear weights kept quantized (pdcore.model.quantized;
        --quantization), the rest from `state`."""
        self.config = config
        self.dtype = dtype
        self.device = device
        self.tp = tp or TPGroup(device=device)
        shard = HeadShard.of(config, self.tp.size, self.tp.rank)
        self.num_heads = shard.num_heads  # this rank's heads (all of them without TP)
        self.num_kv_heads = shard.num_kv_heads

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in state]
        if missing:
            raise ValueError(
                f"checkpoint lacks {', '.join(missing)}; is this a Llama-family model?"
            )
        self.embed = to(state["model.embed_tokens.weight"])
        self.layers = [
            _Layer(state, f"model.layers.{i}.", to, shard, config.head_dim, quant)
            for i in (layer_range if layer_range is not None else range(config.num_layers))
        ]
        self.norm = to(state["model.norm.weight"])
        self.lm_head: Linear | QuantLinear | None = None  # followers never compute logits
        if self.tp.is_driver:
            tied = config.tie_word_embeddings or "lm_head.weight" not in state
            head = "model.embed_tokens.weight" if tied else "lm_head.weight"
            q_head = quant.linear([head], state) if quant is not None else None
            self.lm_head = q_head or Linear(self.embed if tied else to(state[head]))
        if quant is not None:
            logger.info(
                "quantized linear weights: %s%s", quant.method,
                f"; dense: {', '.join(quant.dense)}" if quant.dense else "",
            )  # fmt: skip
        self.rotary = RotaryTable(
            config.head_dim, config.rope_theta, config.rope_scaling, max_positions, dtype, device
        )
        self.q_size = self.num_heads * config.head_dim
        self.kv_size = self.num_kv_heads * config.head_dim
        self._norm_shape = (config.hidden_size,)
        self._native = None  # our fused CPU kernels (bf16 or fp32), where they apply
        self._ws: dict[str, torch.Tensor] = {}  # the native decode loop's buffers
        self._ws_dtype: torch.dtype | None = None
        self._decode_layers: DecodeLayers | None = None  # the one-call C loop, per pool
        self._decode_layers_key: tuple[int, int] | None = None
        if (
            device.type == "cpu"
            and dtype in (torch.bfloat16, torch.float32)
            and config.hidden_size % 16 == 0
            and shard.intermediate % 16 == 0
            and config.head_dim % 32 == 0
        ):
            self._native = native_cpu.kernels(dtype)
            logger.info("CPU kernels: %s", native_cpu.describe())
        if device.type == "cpu":
            self._weights_to_huge_pages()

    def streamed_linears(self) -> list[Linear | QuantLinear]:
        """Every linear a decode step reads through once: each layer's four, then the LM
        head (a TP follower has none)."""
        linears: list[Linear | QuantLinear] = [
            lin
            for layer in self.layers
            for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
        ]
        return linears if self.lm_head is None else [*linears, self.lm_head]

    def _weights_to_huge_pages(self) -> None:
        """The weights every decode step streams, in huge pages (huge_pages.py)."""
        moved = linears_to_huge_pages(self.streamed_linears())
        self._decode_layers_key = None  # never a C loop over the tensors just replaced
        if moved:
            logger.info(
                "streamed weights: %.1f MiB in a mapping advised for transparent huge pages",
                moved / 2**20,
            )
        else:
            logger.info(
                "streamed weights stay in 4 KiB pages: %s",
                thp_unavailable()
                or "none of them packed for our kernels, or the kernel refused the advice",
            )

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # One fused op; in fp32 it equals transformers' step-by-step version bit for bit.
        return F.rms_norm(x, self._norm_shape, weight, self.config.rms_norm_eps)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> torch.Tensor:
        """Return fp32 logits for the rows in batch.logits_indices: [S, vocab] (a TP
        follower returns an empty tensor: only the driver samples)."""
        attn.prepare(batch, pool)
        hidden = F.embedding(batch.input_ids, self.embed)
        every_row = self.lm_head is not None and len(batch.logits_indices) == hidden.shape[0]
        hidden, normed = self._run_layers(hidden, batch, pool, attn, final_norm=every_row)
        if self.lm_head is None:
            return hidden.new_empty((0,))
        if normed is not None:  # the C loop ended with the final norm (decode: every row)
            return self.lm_head(normed).float()
        return self.logits(hidden, batch)

    def run_layers(
        self, hidden: torch.Tensor, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend
    ) -> torch.Tensor:
        """This model's layers over `hidden` (the residual stream, [T, hidden_size]);
        `attn.prepare` must have run for `batch`. A pipeline stage calls it directly."""
        return self._run_layers(hidden, batch, pool, attn, final_norm=False)[0]

    def _run_layers(
        self,
        hidden: torch.Tensor,
        batch: ForwardBatch,
        pool: KVPool,
        attn: AttentionBackend,
        final_norm: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """run_layers, and with `final_norm`, where the one-call C decode loop ran, every
        row's final RMSNorm (what `logits` computes, the same kernel) -- else None."""
        if self._native is not None:  # prefill too: the fused elementwise kernels
            if max(batch.seq_lens) > self.rotary.cos.shape[0]:  # the kernels read unchecked
                raise IndexError(f"a sequence of {max(batch.seq_lens)} is past the rotary table")
            loop = self._c_decode_layers(hidden, batch, pool, attn)
            if loop is not None:
                ws = self._workspace(hidden.shape[0], hidden.dtype)
                scale: float = attn.scale  # type: ignore[attr-defined]  # C_DECODE_ATTENTION
                loop.run(self, hidden, batch, scale, ws, self.norm if final_norm else None)
                return hidden, ws["x"] if final_norm else None
            hidden = self._layers_native(self._native, hidden, batch, pool, attn)
        else:
            cos, sin = self.rotary.lookup(batch.positions)
            for i, layer in enumerate(self.layers):
                x = self._rms_norm(hidden, layer.input_norm)
                out = self._attention(i, layer, x, cos, sin, batch, pool, attn)
                hidden = hidden + self.tp.all_reduce(layer.o_proj(out))
                x = self._rms_norm(hidden, layer.post_norm)
                gate, up = layer.gate_up(x).chunk(2, dim=-1)
                hidden = hidden + self.tp.all_reduce(layer.down(F.silu(gate) * up))
        return hidden, None

    def logits(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits of the rows in batch.logits_indices (the final norm, the LM head)."""
        assert self.lm_head is not None
        hidden = hidden.index_select(0, batch.logits_indices)
        if self._native is not None:  # the layers' norm kernel, as the C loop's final norm
            hidden = self._native.rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        else:
            hidden = self._rms_norm(hidden, self.norm)
        return self.lm_head(hidden).float()

    def _attention(self, i, layer, x, cos, sin, batch, pool, attn) -> torch.Tensor:
        cfg, t = self.config, x.shape[0]
        qkv = layer.qkv(x)
        # RoPE on q and k in one pass: they sit side by side in the fused projection.
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, cfg.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, cfg.head_dim)
        return attn.forward(i, q, k, v, batch, pool)

    def _layers_native(self, kern, hidden, batch, pool, attn) -> torch.Tensor:
        """The same layers with our fused CPU kernels: RoPE in place on the fused
        projection, each residual add folded into the RMSNorm that follows it, SiLU-and-mul
        in one pass (prefill too: ~9% of a 512-token prefill was these ops op by op in
        torch); at decode sizes every intermediate in a buffer reused by each layer. The
        linears pick their own GEMM by row count (pdcore.model.linear / quantized)."""
        cfg, eps, t, tp = self.config, self.config.rms_norm_eps, hidden.shape[0], self.tp
        cos, sin, positions = self.rotary.cos, self.rotary.sin, batch.positions  # checked
        heads, qk_size = self.num_heads + self.num_kv_heads, self.q_size + self.kv_size
        ws: dict[str, torch.Tensor | None] = (
            dict(self._workspace(t, hidden.dtype))
            if t <= native_cpu.MAX_ROWS
            else dict.fromkeys(("x", "qkv", "o", "gate_up", "act", "down"))
        )
        x = kern.rms_norm(hidden, self.layers[0].input_norm, eps, out=ws["x"])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x, out=ws["qkv"])
            kern.rope_(qkv, heads, cfg.head_dim, cos, sin, positions)
            q = qkv[:, : self.q_size].view(t, self.num_heads, cfg.head_dim)
            k = qkv[:, self.q_size : qk_size].view(t, -1, cfg.head_dim)
            v = qkv[:, qk_size:].view(t, -1, cfg.head_dim)
            out = attn.forward(i, q, k, v, batch, pool)
            o = tp.all_reduce(layer.o_proj(out, out=ws["o"]))
            x = kern.rms_norm(hidden, layer.post_norm, eps, delta=o, out=ws["x"])
            act = kern.silu_mul(layer.gate_up(x, out=ws["gate_up"]), out=ws["act"])
            mlp = tp.all_reduce(layer.down(act, out=ws["down"]))
            if i < last:
                x = kern.rms_norm(hidden, self.layers[i + 1].input_norm, eps, mlp, out=ws["x"])
            else:
                hidden.add_(mlp)
        return hidden

    def _c_decode_layers(
        self, hidden: torch.Tensor, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend
    ) -> DecodeLayers | None:
        """The one-call C loop for this decode step (pdcore/model/decode_layers.py), or None
        where the step runs the Python loop."""
        if (
            not batch.is_decode
            or hidden.shape[0] > native_cpu.MAX_ROWS  # the buffers' rows
            or not getattr(attn, C_DECODE_ATTENTION, False)
            or hidden.dtype != torch.float32
            or not hidden.is_contiguous()
            or self._native is None
        ):
            return None
        key = (id(pool), pool.k.data_ptr())
        if self._decode_layers_key != key:  # built once per pool
            self._decode_layers = DecodeLayers.build(self, pool, self._native)
            self._decode_layers_key = key
        return self._decode_layers

    def _workspace(self, t: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The decode loop's intermediates for `t` rows: views of buffers made once for
        MAX_ROWS rows (a new tensor per op per layer cost ~0.5 ms per batch-1 token).
        Each is consumed within its layer, so every layer reuses them."""
        if self._ws_dtype != dtype:
            layer = self.layers[0]
            widths = {
                "x": self.config.hidden_size,
                "qkv": layer.qkv.out_features,
                "o": layer.o_proj.out_features,
                "gate_up": layer.gate_up.out_features,
                "act": layer.gate_up.out_features // 2,
                "down": layer.down.out_features,
                "attn": self.num_heads * self.config.head_dim,
            }
            rows = native_cpu.MAX_ROWS
            self._ws = {name: torch.empty((rows, n), dtype=dtype) for name, n in widths.items()}
            self._ws_dtype = dtype
        return {name: buf[:t] for name, buf in self._ws.items()}
