"""Parity harness: 48 concurrent greedy requests through a pdcore endpoint vs transformers.

Eight prompts of different lengths go through /generate, /v1/completions and
/v1/chat/completions, streaming and not, all at once, so they share batches. Used for a
unified server, and for router -> prefill -> transfer -> decode.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model
from tests.server_helpers import sse_events

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


def run_parity_requests(url: str, tok) -> dict:
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


def assert_matches_hf(results: dict, model_path: str | None, tok) -> None:
    """Every result of run_parity_requests equals transformers' greedy output."""
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
