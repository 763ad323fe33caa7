"""The routing policies' own flags: SGLang's cache-aware knobs and pdcore's KV-aware ones.

`PolicyOptions` is a plain pydantic model of `setting(...)` fields, so `RouterOptions` takes
them by inheriting it (`class RouterOptions(PdcoreSettings, PolicyOptions)`): every field
becomes a `--flag` and a PDCORE_ROUTER_* env var like the router's others. A policy reads
them with `policy_option(settings, name)`, which falls back to these defaults when it is
handed settings without them (a test's bare object, or a router built before the mix-in).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pdcore.settings_base import setting


class PolicyOptions(BaseModel):
    """Routing policy settings (pdcore router)."""

    cache_threshold: float = setting(
        0.3,
        "cache_aware: route to the worker whose prefix tree matches the most of the prompt "
        "when that match covers at least this fraction of it (0-1); below it, to the worker "
        "with the smallest tree.",
        ge=0.0,
        le=1.0,
    )
    balance_abs_threshold: int = setting(
        64,
        "cache_aware, kv_aware: the load (requests in flight) is imbalanced -- and the "
        "least loaded worker is chosen whatever the cache says -- when max - min exceeds "
        "this and max exceeds --balance-rel-threshold x min.",
        ge=0,
    )
    balance_rel_threshold: float = setting(
        1.5,
        "cache_aware, kv_aware: the relative half of the imbalance test (max > this x min).",
        ge=1.0,
    )
    eviction_interval_secs: float = setting(
        60.0,
        "cache_aware: every this many seconds, trim each worker's prefix tree to "
        "--max-tree-size characters, least recently used first.",
        gt=0,
    )
    max_tree_size: int = setting(
        2**26,
        "cache_aware: most characters of prompt text the prefix tree keeps per worker.",
        gt=0,
    )
    kv_poll_interval_secs: float = setting(
        1.0,
        "kv_aware: how often each worker's /kv_cache_blocks is read (its cached prefix blocks).",
        gt=0,
    )
    kv_load_penalty_tokens: float = setting(
        16.0,
        "kv_aware: a worker scores its cached prompt tokens minus this many per request it "
        "has in flight; the highest score wins. 16: 64 more requests weigh as much as a "
        "1,024-token prefix, the scale of --balance-abs-threshold.",
        ge=0,
    )
    kv_tokenizer: str | None = setting(
        None,
        "kv_aware: tokenizer.json (or a folder holding one) to turn prompts into token ids. "
        "Default: the `model_folder` a worker reports in /server_info, when this machine "
        "can read it.",
    )


_DEFAULTS = PolicyOptions()


def policy_option(settings: Any, name: str) -> Any:
    """`settings.<name>`, or its PolicyOptions default when `settings` lacks it."""
    return getattr(settings, name, getattr(_DEFAULTS, name))
