"""What rank 0 tells the other TP ranks each step, as int64 tensors over torch.distributed.

Rank 0 (the driver) runs the scheduler, samples and owns the pages; ranks 1..N-1 (the
followers) only run the forward pass on their shard of the weights, so every step rank 0
broadcasts the `ForwardBatch` it is about to run. The wire is two broadcasts of int64
tensors -- a 2-element header (kind, payload length), then the flat payload -- never
pickle: between nodes this is network data, and a tensor of integers cannot execute code.

Kinds: BATCH (a ForwardBatch follows), HEARTBEAT (nothing follows: rank 0 is idle; sent
at least every HEARTBEAT_S so an idle follower's broadcast never reaches --dist-timeout and
a dead peer is noticed while idle), STOP (clean shutdown).

Payload of a BATCH: [is_decode, page_size, T, S, L] + input_ids(T) + positions(T)
+ out_slots(T) + seq_lens(S) + extend_lens(S) + page-table lengths(S) + the page tables
concatenated + logits_indices(L).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.parallel import TPGroup

BATCH, HEARTBEAT, STOP = 1, 2, 3
HEARTBEAT_S = 1.0
_FIXED = 5
# A payload larger than this is refused on receipt (a corrupt header must not allocate
# gigabytes): 64M int64s = 512 MiB, far above any real batch.
MAX_PAYLOAD = 1 << 26


class TPSyncError(RuntimeError):
    """A message from rank 0 that does not decode."""


def encode_batch(batch: ForwardBatch) -> torch.Tensor:
    """The flat int64 payload of `batch` (on the CPU)."""
    t, s = len(batch.input_ids), batch.num_seqs
    lengths = [len(p) for p in batch.page_tables]
    head = [int(batch.is_decode), batch.page_size, t, s, len(batch.logits_indices)]
    ints = head + batch.seq_lens + batch.extend_lens + lengths
    flat_pages = [p for table in batch.page_tables for p in table]
    return torch.cat(
        [
            torch.tensor(ints[:_FIXED], dtype=torch.long),
            batch.input_ids.cpu(),
            batch.positions.cpu(),
            batch.out_slots.cpu(),
            torch.tensor(ints[_FIXED:] + flat_pages, dtype=torch.long),
            batch.logits_indices.cpu(),
        ]
    )


def decode_batch(payload: torch.Tensor, device: torch.device) -> ForwardBatch:
    """The inverse of `encode_batch`; TPSyncError when the payload is inconsistent."""
    values = payload.cpu()
    if values.numel() < _FIXED:
        raise TPSyncError(f"batch payload of {values.numel()} values is too short")
    is_decode, page_size, t, s, n_logits = values[:_FIXED].tolist()
    if min(t, s, n_logits) < 0 or page_size <= 0 or is_decode not in (0, 1):
        raise TPSyncError(f"bad batch header {values[:_FIXED].tolist()}")
    pos = _FIXED + 3 * t
    if values.numel() < pos + 3 * s + n_logits:
        raise TPSyncError("batch payload shorter than its header says")
    meta = values[pos : pos + 3 * s].tolist()
    seq_lens, extend_lens, lengths = meta[:s], meta[s : 2 * s], meta[2 * s :]
    pos += 3 * s
    if min(lengths, default=0) < 0 or values.numel() != pos + sum(lengths) + n_logits:
        raise TPSyncError("batch payload length does not match its page tables")
    flat = values[pos : pos + sum(lengths)].tolist()
    tables, start = [], 0
    for n in lengths:
        tables.append(flat[start : start + n])
        start += n
    pos += sum(lengths)
    tokens = torch.cat([values[_FIXED : _FIXED + 3 * t], values[pos:]]).to(device)
    return ForwardBatch(
        is_decode=bool(is_decode),
        input_ids=tokens[:t],
        positions=tokens[t : 2 * t],
        out_slots=tokens[2 * t : 3 * t],
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        page_tables=tables,
        logits_indices=tokens[3 * t :],
        page_size=page_size,
    )


@dataclass
class Message:
    kind: int
    batch: ForwardBatch | None = None


class BatchBroadcaster:
    """Rank 0's side: before each forward, send the batch to every follower."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group
        self._last_send = time.monotonic()

    def _header(self, kind: int, length: int) -> None:
        header = torch.tensor([kind, length], dtype=torch.long, device=self.group.device)
        self.group.broadcast(header)
        self._last_send = time.monotonic()

    def send_batch(self, batch: ForwardBatch) -> None:
        payload = encode_batch(batch).to(self.group.device)
        self._header(BATCH, payload.numel())
        self.group.broadcast(payload)

    def heartbeat(self, force: bool = False) -> None:
        """Tell idle followers rank 0 is alive (at most every HEARTBEAT_S unless forced).
        Raises when a follower is gone -- how an idle driver notices a dead rank."""
        if force or time.monotonic() - self._last_send >= HEARTBEAT_S:
            self._header(HEARTBEAT, 0)

    def stop(self) -> None:
        self._header(STOP, 0)


class BatchReceiver:
    """A follower's side: block until rank 0's next message."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group

    def recv(self) -> Message:
        device = self.group.device
        header = self.group.broadcast(torch.zeros(2, dtype=torch.long, device=device))
        kind, length = header.tolist()
        if kind in (HEARTBEAT, STOP):
            return Message(kind)
        if kind != BATCH or not 0 < length <= MAX_PAYLOAD:
            raise TPSyncError(f"bad message header from rank 0: kind={kind} length={length}")
        payload = self.group.broadcast(torch.empty(length, dtype=torch.long, device=device))
        return Message(BATCH, decode_batch(payload, device))
