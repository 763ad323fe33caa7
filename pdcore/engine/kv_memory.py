"""Where the KV cache's memory comes from: plugins may supply an allocator.

Some transports can move only memory from their own allocator (Mooncake's NVLINK and BAREX
custom memory pools). The engine allocates its KV pool inside `kv_pool_allocation(device)`,
which enters what every plugin's `pdcore_kv_pool_allocation(device)` returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pdcore.plugins import get_plugin_manager


@contextlib.contextmanager
def kv_pool_allocation(device: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for ctx in get_plugin_manager().hook.pdcore_kv_pool_allocation(device=device):
            if ctx is not None:
                stack.enter_context(ctx)
        yield
