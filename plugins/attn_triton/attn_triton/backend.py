"""The "triton" attention backend: pdcore's attention contract over the kernels in kernels.py.

prepare() turns the batch's page tables into one int32 table and copies it to the device
once per step; every layer then launches two kernels (decode) or one (extend) reading it.

CUDA graphs (pdcore.engine.cuda_graph): decode metadata lives in one preallocated table of
[max_bs, 1 + max_pages] rows; capture points the kernels at its first `bs` rows, and replay
rewrites those rows in place, so a captured graph serves any sequence lengths. Padding rows
decode one token from the padding page (page 0).
"""

from __future__ import annotations

import torch

from attn_triton import interpreting
from attn_triton.kernels import KernelConfig, decode_attention, extend_attention
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool

# Most splits of one sequence in flash-decoding; partial results cost B*H*splits*D floats.
MAX_SPLITS = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_table(
    seq_lens: list[int], page_tables: list[list[int]], page_size: int, rows: int
) -> torch.Tensor:
    """int32 [rows, 1 + pages]: seq_len then page ids; rows past the batch decode 1 padding token."""
    pages = _cdiv(max(seq_lens), page_size)
    flat: list[int] = []
    for length, table in zip(seq_lens, page_tables):
        n = _cdiv(length, page_size)
        flat.append(length)
        flat.extend(table[:n])
        flat.extend([0] * (pages - n))
    table = torch.tensor(flat, dtype=torch.int32).view(len(seq_lens), 1 + pages)
    if rows > len(seq_lens):
        pad = torch.zeros((rows - len(seq_lens), 1 + pages), dtype=torch.int32)
        pad[:, 0] = 1
        table = torch.cat([table, pad])
    return table


def extend_table(
    seq_lens: list[int], extend_lens: list[int], page_tables: list[list[int]], page_size: int
) -> torch.Tensor:
    """int32 [B, 3 + pages]: seq_len, extend_len, first query row, page ids."""
    pages = _cdiv(max(seq_lens), page_size)
    flat: list[int] = []
    q_start = 0
    for length, ext, table in zip(seq_lens, extend_lens, page_tables):
        n = _cdiv(length, page_size)
        flat += (length, ext, q_start)
        flat.extend(table[:n])
        flat.extend([0] * (pages - n))
        q_start += ext
    return torch.tensor(flat, dtype=torch.int32).view(len(seq_lens), 3 + pages)


class TritonAttentionBackend:
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.scale = head_dim**-0.5
        interpret = interpreting()
        if self.device.type != "cuda" and not interpret:
            raise RuntimeError(
                "the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 to run "
                "its kernels, slowly, in Triton's interpreter)"
            )
        self.cfg = KernelConfig(head_dim, dtype, interpret or self.device.type != "cuda")
        if self.device.type == "cuda":
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.target_programs = 2 * sms
        else:
            self.target_programs = 4  # the interpreter: few programs, but still split a little
        self._graph_table: torch.Tensor | None = None
        self._graph_splits: dict[int, int] = {}

    def num_splits(self, batch_size: int, max_len: int) -> int:
        """Splits per sequence: enough programs to fill the GPU, none empty by construction."""
        blocks = _cdiv(max_len, self.cfg.decode_block_n)
        want = _cdiv(self.target_programs, batch_size * self.num_kv_heads)
        return max(1, min(want, blocks, MAX_SPLITS))

    # ----- the attention contract --------------------------------------------------------
    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        meta = batch.attn_meta
        if batch.is_decode:
            table = decode_table(batch.seq_lens, batch.page_tables, batch.page_size, batch.num_seqs)
            meta["num_splits"] = self.num_splits(batch.num_seqs, max(batch.seq_lens))
        else:
            table = extend_table(
                batch.seq_lens, batch.extend_lens, batch.page_tables, batch.page_size
            )
            meta["max_extend"] = max(batch.extend_lens)
        meta["table"] = table.to(self.device, non_blocking=True)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        pool: KVPool,
    ) -> torch.Tensor:
        k_cache = pool.k_flat(layer)
        v_cache = pool.v_flat(layer)
        k_cache.index_copy_(0, batch.out_slots, k)
        v_cache.index_copy_(0, batch.out_slots, v)
        meta = batch.attn_meta
        if batch.is_decode:
            out = decode_attention(
                q,
                k_cache,
                v_cache,
                meta["table"],
                batch.page_size,
                meta["num_splits"],
                self.scale,
                self.cfg,
            )
        else:
            out = extend_attention(
                q,
                k_cache,
                v_cache,
                meta["table"],
                batch.page_size,
                meta["max_extend"],
                self.scale,
                self.cfg,
            )
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    # ----- CUDA graphs (pdcore.engine.cuda_graph.GraphAttentionBackend) ------------------
    def init_cuda_graph_state(self, max_bs: int, max_pages: int) -> None:
        self._graph_table = torch.zeros(
            (max_bs, 1 + max_pages), dtype=torch.int32, device=self.device
        )

    def prepare_for_capture(self, bs: int, batch: ForwardBatch, pool: KVPool) -> None:
        assert self._graph_table is not None, "init_cuda_graph_state first"
        table = self._graph_table[:bs]
        table.zero_()
        table[:, 0] = 1
        max_pages = self._graph_table.shape[1] - 1
        splits = self.num_splits(bs, max_pages * batch.page_size)
        self._graph_splits[bs] = splits
        batch.attn_meta.update(table=table, num_splits=splits)

    def prepare_for_replay(self, bs: int, batch: ForwardBatch, pool: KVPool) -> None:
        assert self._graph_table is not None, "init_cuda_graph_state first"
        table = decode_table(batch.seq_lens, batch.page_tables, batch.page_size, bs)
        if table.shape[1] > self._graph_table.shape[1]:
            raise ValueError("a sequence is longer than the CUDA graph page table")
        self._graph_table[:bs, : table.shape[1]].copy_(table, non_blocking=True)
