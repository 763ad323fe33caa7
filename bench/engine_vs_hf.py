"""pdcore's engine vs transformers `generate`, side by side in one run, on the default model.

Prints JSON: decode tokens/s at batch 1, 8 and 32 and prefill tokens/s for a 512-token
prompt, for bf16 and fp32, plus pdcore/transformers ratios. Decode speed is measured as
(time for N new tokens - time for 1 new token) so prefill does not pollute it; both
engines get the same token ids, greedy, ignore_eos.

    .venv/bin/python bench/engine_vs_hf.py [--new-tokens 64] [--dtypes bfloat16,float32]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import torch

PROMPT_LEN = 64
PREFILL_LEN = 512


def _prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    text = (
        "In a quiet village by the sea, the old lighthouse keeper told stories every night. " * 40
    )
    base = tokenizer.encode(text)
    return [base[i : i + length] for i in range(batch)]  # equal lengths: no padding for HF


def _time_pdcore(engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    engine.core.flush_cache()  # no prefix-cache help between runs
    start = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - start


def _time_hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def _measure(run, prompts_for, new_tokens: int, batches: tuple[int, ...]) -> dict:
    decode = {}
    for batch in batches:
        prompts = prompts_for(batch, PROMPT_LEN)
        run(prompts, 2)  # warm-up
        t1 = min(run(prompts, 1) for _ in range(2))
        tn = run(prompts, new_tokens)
        decode[str(batch)] = round(batch * (new_tokens - 1) / max(tn - t1, 1e-9), 2)
    prompt = prompts_for(1, PREFILL_LEN)
    run(prompt, 1)
    prefill_time = min(run(prompt, 1) for _ in range(2))
    return {"decode_tok_s": decode, "prefill_tok_s_512": round(PREFILL_LEN / prefill_time, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))

    from transformers import AutoModelForCausalLM

    from pdcore.model.loader import default_model_path
    from pdcore.offline import Engine

    gguf = default_model_path()
    report = {
        "model": gguf.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "new_tokens": args.new_tokens,
        "results": {},
        "ratios_pdcore_over_hf": {},
    }
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        engine = Engine(dtype=dtype_name, max_total_tokens=32768)

        def prompts_for(batch: int, length: int, tok=engine.tokenizer) -> list[list[int]]:
            return _prompts(tok, batch, length)

        ours = _measure(
            functools.partial(_time_pdcore, engine), prompts_for, args.new_tokens, batches
        )
        del engine
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype
        ).eval()
        theirs = _measure(
            functools.partial(_time_hf, hf_model), prompts_for, args.new_tokens, batches
        )
        del hf_model
        report["results"][dtype_name] = {"pdcore": ours, "transformers": theirs}
        report["ratios_pdcore_over_hf"][dtype_name] = {
            **{
                f"decode_b{b}": round(ours["decode_tok_s"][b] / theirs["decode_tok_s"][b], 2)
                for b in ours["decode_tok_s"]
            },
            "prefill_512": round(ours["prefill_tok_s_512"] / theirs["prefill_tok_s_512"], 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
