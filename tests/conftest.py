"""Shared fixtures: a tiny random-weight Llama, the default model's path, free ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdcore.launch import free_port  # noqa: F401 - the tests import it from here

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (2 layers, GQA 4:2, llama3 RoPE scaling) saved as an HF folder.

    It borrows the default model's tokenizer and chat template, so text routes work; the
    weights are random, so its text is noise but its greedy tokens are well defined.
    """
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepseekV3 (MLA, MoE with a shared expert; tests/tiny_models.py)."""
    from tests.tiny_models import build_tiny_deepseek_v3

    return build_tiny_deepseek_v3(tmp_path_factory.mktemp("tiny-deepseek-v3"))


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-MoE (tests/tiny_models.py)."""
    from tests.tiny_models import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reports that tests print (fault timings, chaos numbers, accuracy) in the CI log
    even when they pass and run in pytest-xdist workers, whose output is otherwise dropped:
    the standard output of each passed test, its last 4,000 characters."""
    for report in terminalreporter.stats.get("passed", []):
        if report.when != "call":
            continue
        out = "".join(text for name, text in report.sections if name == "Captured stdout call")
        if out.strip():
            terminalreporter.write_sep("-", f"printed by {report.nodeid}")
            terminalreporter.write(out[-4000:].rstrip() + "\n")
