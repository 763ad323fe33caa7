"""Incremental detokenization with stop strings, held back until they cannot be a stop's start.

Decoding a sliding window (vLLM's prefix/read offsets) keeps each step O(window), and an
unfinished UTF-8 sequence ("\ufffd") is never emitted half-way.
"""

from __future__ import annotations

from typing import Protocol


class TextDecoder(Protocol):
    """What detokenizing needs of a tokenizer (pdcore's TextTokenizer, or transformers')."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: TextDecoder | None, stop: list[str], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text so far (stop-trimmed once a stop matched)
        self._sent = 0  # chars of self.text already taken

    def _decode(self, ids: list[int]) -> str:
        assert self._tokenizer is not None
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))

    def append(self, token_id: int) -> str | None:
        """Add one token; return the stop string it completed, if any (text is then trimmed)."""
        self._ids.append(token_id)
        if self._tokenizer is None:
            return None
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        search_from = max(0, len(self.text) - self._hold)
        self.text += delta
        for stop in self.stop:
            pos = self.text.find(stop, search_from)
            if pos != -1:
                self.text = self.text[:pos]
                return stop
        return None

    def take_text(self, final: bool) -> str:
        """Text not yet taken; while unfinished, keep back what could begin a stop string."""
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        chunk = self.text[self._sent : end]
        self._sent = end
        return chunk
