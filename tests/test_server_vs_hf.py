"""Greedy outputs through a real `pdcore serve` equal transformers' greedy tokens (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdcore.model.tokenizer import load_tokenizer
from tests.parity import assert_matches_hf, run_parity_requests
from tests.server_helpers import ServerProcess


def _check_server_against_hf(model_path: str | None, tmp_path: Path) -> None:
    tok = load_tokenizer(model_path)
    server = ServerProcess(model_path, tmp_path / "server.log")
    try:
        server.wait_ready()
        results = run_parity_requests(server.url, tok)
    finally:
        server.stop()
    assert_matches_hf(results, model_path, tok)


@pytest.mark.slow
def test_tiny_llama_server_matches_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    _check_server_against_hf(str(tiny_llama_dir), tmp_path)


@pytest.mark.slow
def test_default_model_server_matches_transformers(tmp_path: Path) -> None:
    _check_server_against_hf(None, tmp_path)
