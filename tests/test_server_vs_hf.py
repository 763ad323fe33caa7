"""Greedy outputs through a real `pdcore serve` equal transformers' greedy tokens (fp32).

Eight prompts of different lengths go through /generate, /v1/completions and
/v1/chat/completions, streaming and not, all 48 requests at once, so they share batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdcore.model.tokenizer import load_tokenizer
from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model
from tests.server_helpers import ServerProcess, sse_events

MAX_TOKENS = 16


def _generate(client: httpx.Client, ids: list[int], stream: bool) -> list[int]:
    body = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": MAX_TOKENS},
        "stream": stream,
    }
    if not stream:
        return client.post("/generate", json=body).json()["output_ids"]
    with client.stream("POST", "/generate", json=body) as r:
        events = sse_events(r)
    return events[-2]["output_ids"]


def _openai_text(client: httpx.Client, route: str, payload: dict, stream: bool) -> str:
    body = {"model": "m", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream, **payload}
    if not stream:
        choice = client.post(route, json=body).json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    with client.stream("POST", route, json=body) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    parts = []
    for e in events:
        for choice in e.get("choices", []):
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def _run_all(url: str, tok) -> dict:
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    jobs = {}
    with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(48) as pool:
        for stream in (False, True):
            for i, prompt in enumerate(PROMPTS):
                ids = tok.encode(prompt)
                jobs[("generate", stream, i)] = pool.submit(_generate, client, ids, stream)
                jobs[("completions", stream, i)] = pool.submit(
                    _openai_text, client, "/v1/completions", {"prompt": prompt}, stream
                )
                jobs[("chat", stream, i)] = pool.submit(
                    _openai_text, client, "/v1/chat/completions", {"messages": chats[i]}, stream
                )
        return {key: job.result() for key, job in jobs.items()}


def _check_server_against_hf(model_path: str | None, tmp_path: Path) -> None:
    tok = load_tokenizer(model_path)
    server = ServerProcess(model_path, tmp_path / "server.log")
    try:
        server.wait_ready()
        results = _run_all(server.url, tok)
    finally:
        server.stop()

    hf = load_hf_model(model_path)
    eos = [tok.eos_token_id]
    plain_ids = [tok.encode(p) for p in PROMPTS]
    chat_ids = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for p in PROMPTS
    ]
    plain_ref = hf_greedy(hf, plain_ids, MAX_TOKENS, eos)
    chat_ref = hf_greedy(hf, chat_ids, MAX_TOKENS, eos)
    # Guard against a vacuous pass (both sides stopping at once).
    assert sum(map(len, plain_ref)) > 4 * len(PROMPTS) and sum(map(len, chat_ref)) > 4 * len(
        PROMPTS
    )
    for stream in (False, True):
        for i in range(len(PROMPTS)):
            where = f"prompt {i} stream={stream}"
            assert results[("generate", stream, i)] == plain_ref[i], f"/generate {where}"
            want = tok.decode(plain_ref[i], skip_special_tokens=True)
            assert results[("completions", stream, i)] == want, f"/v1/completions {where}"
            want_chat = tok.decode(chat_ref[i], skip_special_tokens=True)
            assert results[("chat", stream, i)] == want_chat, f"/v1/chat/completions {where}"


@pytest.mark.slow
def test_tiny_llama_server_matches_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    _check_server_against_hf(str(tiny_llama_dir), tmp_path)


@pytest.mark.slow
def test_default_model_server_matches_transformers(tmp_path: Path) -> None:
    _check_server_against_hf(None, tmp_path)
