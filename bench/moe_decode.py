"""A decode step of the tiny DeepseekV3 (MLA + MoE) at batch 8: pdcore vs transformers on the
same weights, fp32, same device. Prints JSON.

Both sides generate N new tokens and 1 new token for the same 8 equal-length prompts
(greedy, eos ignored); a decode step is (t_N - t_1) / (N - 1), best of --repeats, so
prefill does not count. pdcore runs its offline engine (scheduler, absorbed-MLA decode over
the paged latent cache, grouped experts); transformers runs `generate` with its own cache.
`ratio_hf_over_pdcore` > 1 means pdcore's step is faster (wall time; also given in process
CPU time, steadier when the machine is shared).

    .venv/bin/python bench/moe_decode.py [--model-path DIR] [--batch 8] [--new-tokens 32]
        [--device cpu|cuda] [--out FILE]

Without --model-path the model is built in a temp folder by tests/tiny_models.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN = 32


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    text = "In a quiet village by the sea, the old lighthouse keeper told stories. " * 20
    base = tokenizer.encode(text)
    return [base[i : i + PROMPT_LEN] for i in range(batch)]


def _step_ms(run, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one decode step. CPU time (all threads) is the steadier
    number on a machine shared with other work: waiting for a core does not count."""

    def timed(n: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        run(prompts, n)
        return time.perf_counter() - wall, time.process_time() - cpu

    timed(2)  # warm-up
    one = [timed(1) for _ in range(repeats)]
    many = [timed(new_tokens) for _ in range(repeats)]
    steps = new_tokens - 1
    wall = (min(w for w, _ in many) - min(w for w, _ in one)) / steps * 1000
    cpu = (min(c for _, c in many) - min(c for _, c in one)) / steps * 1000
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    folder = Path(args.model_path) if args.model_path else None
    if folder is None:
        from tests.tiny_models import build_tiny_deepseek_v3

        folder = build_tiny_deepseek_v3(Path(tempfile.mkdtemp(prefix="tiny-deepseek-")))

    from transformers import AutoModelForCausalLM

    from pdcore.offline import Engine

    engine = Engine(
        model_path=str(folder),
        dtype="float32",
        device=args.device,
        max_total_tokens=8192,
        disable_radix_cache=True,
    )
    prompts = _prompts(engine.tokenizer, args.batch)

    def run_pdcore(ps: list[list[int]], n: int) -> None:
        params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
        engine.generate(input_ids=ps, sampling_params=params)

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf = hf.to(args.device).eval()

    def run_hf(ps: list[list[int]], n: int) -> None:
        ids = torch.tensor(ps, device=args.device)
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    pd_ms, pd_cpu = _step_ms(run_pdcore, prompts, args.new_tokens, args.repeats)
    hf_ms, hf_cpu = _step_ms(run_hf, prompts, args.new_tokens, args.repeats)
    result = {
        "model": "tiny DeepseekV3 (3 layers, 1 dense; MLA q/kv LoRA 32/32, rope 16; "
        "8 routed experts top-2 in 4 groups, 1 shared)",
        "model_path": str(folder),
        "device": args.device,
        "dtype": "float32",
        "batch": args.batch,
        "prompt_len": PROMPT_LEN,
        "new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "pdcore_decode_step_ms": round(pd_ms, 3),
        "transformers_decode_step_ms": round(hf_ms, 3),
        "pdcore_decode_tok_s": round(args.batch * 1000 / pd_ms, 1),
        "transformers_decode_tok_s": round(args.batch * 1000 / hf_ms, 1),
        "ratio_hf_over_pdcore": round(hf_ms / pd_ms, 3),
        "pdcore_decode_step_cpu_ms": round(pd_cpu, 3),
        "transformers_decode_step_cpu_ms": round(hf_cpu, 3),
        "cpu_time_ratio_hf_over_pdcore": round(hf_cpu / max(pd_cpu, 1e-9), 3),
        "load_average": list(os.getloadavg()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
