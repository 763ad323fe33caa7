"""Turn a batch of logits into next tokens: penalties, temperature, top-k/p, min-p, seeds.

The common case (every request greedy) is one argmax; the rest stay batched except
penalties and per-request seeds, which need per-request state anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdcore.engine.request import Request


def _apply_penalties(logits: torch.Tensor, reqs: Sequence[Request]) -> None:
    for i, req in enumerate(reqs):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_ids)), dtype=torch.long, device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.frequency_penalty or p.presence_penalty) and req.output_ids:
            out = torch.tensor(req.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(
                logits.dtype
            )


def _block_eos(logits: torch.Tensor, reqs: Sequence[Request], eos_ids: Sequence[int]) -> None:
    for i, req in enumerate(reqs):
        if len(req.output_ids) < req.params.min_new_tokens:
            ids = list(eos_ids) + list(req.params.stop_token_ids)
            if ids:
                logits[i, ids] = float("-inf")


def _filter(logits: torch.Tensor, reqs: Sequence[Request]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p; returns probabilities."""
    temps = torch.tensor([max(r.params.temperature, 1e-5) for r in reqs], device=logits.device)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    top_ks = [r.params.top_k for r in reqs]
    top_ps = [r.params.top_p for r in reqs]
    min_ps = [r.params.min_p for r in reqs]
    if all(k == -1 for k in top_ks) and all(p >= 1.0 for p in top_ps) and not any(min_ps):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[1]
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.tensor([vocab if x == -1 else x for x in top_ks], device=probs.device)[:, None]
    drop = ranks >= k
    cum = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
    drop |= cum > torch.tensor(top_ps, device=probs.device)[:, None]
    min_p = torch.tensor(min_ps, device=probs.device)[:, None]
    drop |= sorted_probs < sorted_probs[:, :1] * min_p
    drop[:, 0] = False  # always keep the most likely token
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def sample(
    logits: torch.Tensor, reqs: Sequence[Request], eos_ids: Sequence[int]
) -> tuple[list[int], list[float] | None]:
    """Return next token ids and, when any request asked, their logprobs (raw model distribution)."""
    needs_penalty = any(
        r.params.repetition_penalty != 1.0
        or r.params.frequency_penalty
        or r.params.presence_penalty
        for r in reqs
    )
    if needs_penalty or any(r.params.min_new_tokens for r in reqs):
        logits = logits.clone()
        _apply_penalties(logits, reqs)
        _block_eos(logits, reqs, eos_ids)
    logprobs_all = None
    if any(r.return_logprob for r in reqs):
        logprobs_all = torch.log_softmax(logits, dim=-1)
    if all(r.params.greedy for r in reqs):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        probs = _filter(logits[sampled], [reqs[i] for i in sampled])
        for row, i in enumerate(sampled):
            gen = None
            seed = reqs[i].params.seed
            if seed is not None:
                # Deterministic per (seed, position): same seed, same prompt, same output.
                gen = torch.Generator(device=probs.device).manual_seed(
                    seed + len(reqs[i].output_ids)
                )
            tokens[i] = torch.multinomial(probs[row], 1, generator=gen)[0]
    token_list = tokens.tolist()
    if logprobs_all is None:
        return token_list, None
    return token_list, logprobs_all.gather(1, tokens[:, None]).squeeze(1).tolist()
