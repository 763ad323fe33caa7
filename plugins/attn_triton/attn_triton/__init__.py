"""pdcore attention backend on Triton kernels (`--attention-backend triton`).

Only the hook, the availability check and a lazy factory live here: `pdcore plugins` imports
this module, and importing triton (or torch) is left to the moment the backend is chosen.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from pdcore import hookimpl
from pdcore.hookspecs import Register


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's numpy interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def check() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton not installed (pip install triton)"
    if interpreting():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, slowly, for tests)"
    return None


def create(**kwargs: Any) -> Any:
    from attn_triton.backend import TritonAttentionBackend

    return TritonAttentionBackend(**kwargs)


@hookimpl
def pdcore_register_attention_backends(register: Register) -> None:
    register(
        "triton",
        create,
        description="Triton kernels: paged flash-decoding and causal extend; CUDA graphs",
        check=check,
    )
