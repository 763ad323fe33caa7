"""The greedy-parity check of a real server against transformers (fp32): 8 prompts at once
through the openai client (stream and not) and /generate token ids. Shared by the TP and
PP tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model

MAX_TOKENS = 8


def hf_reference(model_path: str | None, tok) -> list[list[int]]:
    ids = [tok.encode(p) for p in PROMPTS]
    return hf_greedy(load_hf_model(model_path), ids, MAX_TOKENS, [tok.eos_token_id])


def check_against_hf(url: str, model_path: str | None) -> None:
    """8 prompts at once through the openai client (stream and not) and /generate."""
    from pdcore.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def complete(prompt: str, stream: bool) -> str:
        kwargs = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        if not stream:
            return client.completions.create(**kwargs).choices[0].text
        chunks = client.completions.create(stream=True, **kwargs)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def generate(prompt: str) -> list[int]:
        body = {
            "input_ids": tok.encode(prompt),
            "sampling_params": {"temperature": 0, "max_new_tokens": MAX_TOKENS},
        }
        return httpx.post(url + "/generate", json=body, timeout=300).json()["output_ids"]

    with ThreadPoolExecutor(3 * len(PROMPTS)) as pool:
        plain = [pool.submit(complete, p, False) for p in PROMPTS]
        streamed = [pool.submit(complete, p, True) for p in PROMPTS]
        ids = [pool.submit(generate, p) for p in PROMPTS]
        got = [[f.result() for f in fs] for fs in (plain, streamed, ids)]
    want = hf_reference(model_path, tok)
    assert sum(map(len, want)) > 4 * len(PROMPTS)  # not a vacuous pass
    for i, ref in enumerate(want):
        # random weights can end on half a UTF-8 character: the server holds it back
        text = tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")
        assert got[0][i] == text, f"prompt {i} (not streamed)"
        assert got[1][i] == text, f"prompt {i} (streamed)"
        assert got[2][i] == ref, f"prompt {i} (/generate ids)"
