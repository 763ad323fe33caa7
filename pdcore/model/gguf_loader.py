"""Turn a llama.cpp GGUF file into Hugging Face-named fp32 tensors and a ModelConfig.

Dequantizes exactly as transformers' GGUF integration does (including llama.cpp's q/k row
permutation, undone here), so pdcore and transformers run on the same weights. For
`--quantization gguf`, `read_gguf_quantized` hands out the linear weights' raw blocks
instead (same names, same row order), for pdcore.model.quantized to repack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pdcore.model.config import SUPPORTED_ARCHITECTURES, ModelConfig

if TYPE_CHECKING:
    from gguf import GGUFReader

    from pdcore.model.quantized import GGUFRows

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_config(reader: GGUFReader) -> ModelConfig:
    arch = str(_field(reader, "general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture '{arch}'; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", num_heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens)))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    rope_scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {
            "rope_type": "linear",
            "factor": float(_field(reader, f"{arch}.rope.scaling.factor")),
        }
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=rope_scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        base = _LAYER_TENSORS.get(parts[2])
        return None if base is None else f"model.layers.{parts[1]}.{base}.{parts[3]}"
    base = _GLOBAL_TENSORS.get(parts[0])
    return None if base is None else f"{base}.{parts[1]}"


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (its converter permutes them for its RoPE)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def iter_gguf_tensors(
    path: Path, config: ModelConfig, reader: GGUFReader | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, fp32 tensor) for every weight; dequantizes one tensor at a time."""
    import gguf

    reader = reader or gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        data = np.asarray(data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        if ".attn_q." in tensor.name:
            data = _unpermute(data, config.num_heads)
        elif ".attn_k." in tensor.name:
            data = _unpermute(data, config.num_kv_heads)
        yield name, torch.from_numpy(np.array(data, dtype=np.float32, order="C", copy=True))


def count_gguf_tensors(reader: GGUFReader) -> int:
    return sum(1 for t in reader.tensors if _hf_name(t.name) is not None)


_NOT_LINEAR = ("attn_norm", "ffn_norm", "output_norm")


def read_gguf_quantized(path: Path, config: ModelConfig) -> dict[str, GGUFRows]:
    """The linear weights (and token_embd, the tied LM head) whose type the quantized
    kernels read (Q4_0, Q4_1, Q8_0), as raw blocks by HF name, q/k rows un-permuted like
    `iter_gguf_tensors` does. Blocks lie along K, so permuting rows moves whole blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from pdcore.model.gguf_header import read_gguf_header
    from pdcore.model.quantized import GGUF_KERNEL_TYPES, GGUFRows

    # The header read directly (pdcore.model.gguf_header), not through gguf.GGUFReader,
    # which spends seconds indexing the vocabulary before the first tensor can be read.
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, GGUFRows] = {}
    for tensor in read_gguf_header(path).tensors:
        name = _hf_name(tensor.name)
        kind = GGMLQuantizationType(tensor.ggml_type).name
        if (
            name is None
            or kind not in GGUF_KERNEL_TYPES
            or tensor.name.split(".")[-2] in _NOT_LINEAR
        ):
            continue
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
        k = tensor.dims[0]
        rows = int(np.prod(tensor.dims[1:]))
        row_bytes = k // block * block_bytes
        # uint8 [N, row bytes], memory-mapped
        data = mapped[tensor.offset : tensor.offset + rows * row_bytes].reshape(rows, row_bytes)
        if ".attn_q." in tensor.name:
            data = _unpermute(data, config.num_heads)
        elif ".attn_k." in tensor.name:
            data = _unpermute(data, config.num_kv_heads)
        out[name] = GGUFRows(kind, data, k)
    return out
