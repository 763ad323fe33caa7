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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdcore.model.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        initializer_range=0.2,  # wide logits: no near-ties between greedy candidates
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


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
