"""Router -> prefill -> mooncake (TCP) -> decode, all real processes: greedy outputs equal
transformers' (and so unified mode's), and nothing is left held afterwards."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pdcore.model.tokenizer import load_tokenizer
from pdcore.plugins import get_registry
from tests.parity import assert_matches_hf, run_parity_requests
from tests.test_pd_e2e import PDDeployment, _idle_tokens

mooncake_available = any(
    info.name == "mooncake" and info.available
    for info in get_registry("transfer_backend").describe()
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not mooncake_available, reason="the mooncake backend is not available"),
]


def test_pd_over_mooncake_equals_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pd = PDDeployment(tiny_llama_dir, tmp_path, backend="mooncake")
    try:
        pd.start()
        assert pd.router is not None
        tok = load_tokenizer(str(tiny_llama_dir))
        results = run_parity_requests(pd.router.url, tok)
        assert_matches_hf(results, str(tiny_llama_dir), tok)
        assert _idle_tokens(pd.prefill.url) == 0
        assert _idle_tokens(pd.decode.url) == 0
        for url in (pd.prefill.url, pd.decode.url):
            text = httpx.get(url + "/metrics").text
            assert 'pdcore_kv_transfer_bytes{backend="mooncake"}' in text
        sent = httpx.get(pd.prefill.url + "/metrics").text
        line = next(x for x in sent.splitlines() if x.startswith("pdcore_kv_transfers{"))
        assert float(line.split()[-1]) >= 48  # one transfer per request of the parity run
    finally:
        pd.stop()
