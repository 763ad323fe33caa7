"""The prompts a benchmark sends: random-length prompts or ShareGPT-like conversations.

Both samplers are deterministic for a seed, so two runs (or two servers) see the same
requests. With a tokenizer, lengths are exact token counts; without one they are
estimates (one word ~ one token, four characters ~ one token), and the report then relies
on the token counts the server returns.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SHAREGPT_MINI = "sharegpt_mini.jsonl"

# ShareGPT sampling limits, the same as SGLang's: too short to measure, or too long.
MIN_LEN = 2
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: the prompt text, its length in tokens and how many to generate."""

    prompt: str
    prompt_len: int
    output_len: int


def sample_lengths(rng: random.Random, mean_len: int, range_ratio: float, count: int) -> list[int]:
    """Lengths drawn uniformly from [max(1, int(mean_len * range_ratio)), mean_len], as
    SGLang's random dataset does: range_ratio 1.0 gives fixed lengths, 0.0 the widest spread."""
    if mean_len < 1:
        raise ValueError(f"length must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range ratio must be in [0, 1], got {range_ratio}")
    low = max(1, int(mean_len * range_ratio))
    return [rng.randint(low, mean_len) for _ in range(count)]


def load_conversations(path: str | Path | None = None) -> list[list[str]]:
    """The turns of each conversation in a ShareGPT file (JSON list or JSON lines); None
    reads the small file shipped with pdcore."""
    if path is None:
        shipped = resources.files("pdcore.bench").joinpath("data").joinpath(SHAREGPT_MINI)
        text = shipped.read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows: list[Any] = json.loads(stripped)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    conversations = []
    for row in rows:
        turns = row.get("conversations") or row.get("conversation") or []
        values = [t.get("value") or t.get("content") or "" for t in turns if isinstance(t, dict)]
        if len(values) >= 2:
            conversations.append(values)
    return conversations


def _count_tokens(tokenizer: Any | None, text: str) -> int:
    if tokenizer is None:
        return max(1, (len(text) + 3) // 4)
    return len(tokenizer.encode(text, add_special_tokens=False))


def sample_sharegpt(
    num_prompts: int,
    seed: int,
    tokenizer: Any | None = None,
    path: str | Path | None = None,
    fixed_output_len: int | None = None,
) -> list[BenchRequest]:
    """First human turn as the prompt, the answer's length as output_len (or
    `fixed_output_len`); conversations too short or too long are skipped, as in SGLang.
    Repeats the shuffled set when more prompts are asked than the file holds."""
    conversations = load_conversations(path)
    rng = random.Random(seed)
    rng.shuffle(conversations)
    pool: list[BenchRequest] = []
    for turns in conversations:
        prompt_len = _count_tokens(tokenizer, turns[0])
        output_len = fixed_output_len or _count_tokens(tokenizer, turns[1])
        if prompt_len < MIN_LEN or output_len < MIN_LEN:
            continue
        if prompt_len > MAX_PROMPT_LEN or prompt_len + output_len > MAX_TOTAL_LEN:
            continue
        pool.append(BenchRequest(turns[0], prompt_len, output_len))
    if not pool:
        raise ValueError("the ShareGPT file has no usable conversation")
    return [pool[i % len(pool)] for i in range(num_prompts)]


def _word_pool(seed: int) -> list[str]:
    words = [w for turns in load_conversations() for t in turns for w in t.split()]
    random.Random(seed).shuffle(words)
    return words


def sample_random(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    tokenizer: Any | None = None,
) -> list[BenchRequest]:
    """Prompts of random lengths cut from shuffled text (so every prompt differs and the
    prefix cache cannot help); with a tokenizer the prompt re-encodes to exactly its length
    where the tokenizer allows, and its recorded length is what it re-encodes to."""
    rng = random.Random(seed)
    in_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    words = _word_pool(seed)
    ids: list[int] = []
    if tokenizer is not None:
        ids = list(tokenizer.encode(" ".join(words), add_special_tokens=False))
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        if tokenizer is None:
            start = rng.randrange(len(words))
            chunk = [words[(start + j) % len(words)] for j in range(n_in)]
            requests.append(BenchRequest(" ".join(chunk), n_in, n_out))
            continue
        prompt, actual = _exact_prompt(tokenizer, ids, rng.randrange(len(ids)), n_in)
        requests.append(BenchRequest(prompt, actual, n_out))
    return requests


def _exact_prompt(tokenizer: Any, ids: list[int], start: int, length: int) -> tuple[str, int]:
    """Decode `length` ids from `start` (wrapping); decoding then encoding can merge or
    split tokens, so trim or extend a few times until the text encodes to `length`."""
    chunk = [ids[(start + j) % len(ids)] for j in range(length)]
    text = tokenizer.decode(chunk)
    for step in range(4):
        encoded = list(tokenizer.encode(text, add_special_tokens=False))
        if len(encoded) == length:
            break
        if len(encoded) > length:
            encoded = encoded[:length]
        else:
            more = start + length + step * length
            encoded += [ids[(more + j) % len(ids)] for j in range(length - len(encoded))]
        text = tokenizer.decode(encoded)
    return text, len(tokenizer.encode(text, add_special_tokens=False))
