"""The tokenizer of a model, shared by the engine (detokenizing) and the HTTP frontend (tokenizing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdcore.model.loader import resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(
    model_path: str | None, tokenizer_path: str | None = None
) -> PreTrainedTokenizerBase:
    """Return the HF fast tokenizer of the model (converted from the GGUF on first start)."""
    from transformers import AutoTokenizer

    folder = tokenizer_path or str(resolve_model(model_path).folder)
    return AutoTokenizer.from_pretrained(folder)
