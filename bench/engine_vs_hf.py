"""pdcore's engine vs transformers `generate`, side by side in one run, on the default model.

Prints JSON: decode tokens/s at batch 1, 8 and 32 and prefill tokens/s for a 512-token
prompt, for pdcore in each of --dtypes (default: auto, the dtype `pdcore serve` picks) and
transformers in each of --hf-dtypes, plus pdcore's ratio to transformers' best dtype per
measurement. Decode speed is measured as (time for N new tokens - time for 1 new token) so
prefill does not pollute it; both engines get the same token ids, greedy, ignore_eos.

Also in the JSON: the CPU (model name, the ISA flags that matter, the kernel variant in use),
the machine's measured memory read bandwidth (a multi-threaded sum over 1 GiB, best of 5)
and pdcore's batch-1 decode as a fraction of the memory roofline: (bytes of weights + KV
cache read per token) / bandwidth is the fastest a token can be; the fraction is measured
tok/s over that bound.

    .venv/bin/python bench/engine_vs_hf.py [--new-tokens 64] [--dtypes auto]
        [--hf-dtypes float32,bfloat16] [--quantizations auto,none]

--quantizations runs pdcore once per value (auto keeps the GGUF's Q4_1/Q8_0 blocks, none
dequantizes them); the roofline's bytes per token are then the quantized blocks' bytes.

Interleaved: every engine is loaded first, then each measurement (decode at one batch
size, prefill) runs on every engine back to back before the next -- this machine kind's
speed drifts by up to 1.5x within minutes, and measuring pdcore's column minutes before
transformers' once put a single run's ratios off by that much. Prefill takes
--prefill-rounds alternating rounds (best of each engine, and the median of the per-round
ratios); the read bandwidth for the roofline is measured right before and after pdcore's
batch-1 decode (the higher one counts: the stricter bound). Because a single bandwidth
sample can catch a moment the machine is 1.5x faster or slower than the decode that
follows it, --roofline-rounds more pairs of (bandwidth, batch-1 decode) follow, each pair
back to back; `rounds` lists each pair's fraction and `median_round_fraction` their median
(the first pair is the measurement above with its after-bandwidth).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

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


class Runner:
    """One engine under test: `run(prompts, new_tokens) -> seconds`, its prompts, and (for
    pdcore) the engine, for the roofline's bytes per token."""

    def __init__(self, side: str, key: str, run, prompts_for, engine=None) -> None:
        self.side, self.key, self.run, self.prompts_for, self.engine = (
            side, key, run, prompts_for, engine,
        )  # fmt: skip
        self.result: dict = {"decode_tok_s": {}}


def _decode_tok_s(runner: Runner, batch: int, new_tokens: int) -> float:
    prompts = runner.prompts_for(batch, PROMPT_LEN)
    runner.run(prompts, 2)  # warm-up
    t1 = min(runner.run(prompts, 1) for _ in range(2))
    tn = runner.run(prompts, new_tokens)
    return round(batch * (new_tokens - 1) / max(tn - t1, 1e-9), 2)


def _measure_interleaved(
    runners: list[Runner],
    new_tokens: int,
    batches: tuple[int, ...],
    prefill_rounds: int,
    roofline_rounds_n: int = 1,
) -> dict:
    """Each measurement on every runner back to back (see the module docstring). Returns
    per pdcore runner the higher of the bandwidths measured before and after its batch-1
    decode, the prefill rounds, and the (bandwidth, batch-1 tok/s) roofline pairs."""
    bandwidth: dict[str, float] = {}
    roofline_rounds: dict[str, list[tuple[float, float]]] = {}
    for batch in batches:
        for r in runners:
            measure_bw = batch == 1 and r.side == "pdcore"
            before = read_bandwidth_gb_s() if measure_bw else 0.0
            r.result["decode_tok_s"][str(batch)] = _decode_tok_s(r, batch, new_tokens)
            if measure_bw:  # the higher of before and after: the stricter roofline
                after = read_bandwidth_gb_s()
                bandwidth[r.key] = max(before, after)
                roofline_rounds[r.key] = [(after, r.result["decode_tok_s"][str(batch)])]
    for _ in range(roofline_rounds_n - 1):  # more (bandwidth, batch-1 decode) pairs
        for r in runners:
            if r.side == "pdcore" and r.key in roofline_rounds:
                bw = read_bandwidth_gb_s()
                roofline_rounds[r.key].append((bw, _decode_tok_s(r, 1, new_tokens)))
    prompts = {r.key: r.prompts_for(1, PREFILL_LEN) for r in runners}
    for r in runners:
        r.run(prompts[r.key], 1)  # warm-up
    rounds: list[dict[str, float]] = []
    for _ in range(prefill_rounds):
        rounds.append({r.key: r.run(prompts[r.key], 1) for r in runners})
    for r in runners:
        r.result["prefill_tok_s_512"] = round(PREFILL_LEN / min(t[r.key] for t in rounds), 1)
    return {"bandwidth": bandwidth, "prefill_rounds": rounds, "roofline_rounds": roofline_rounds}


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")


def _cpu_info() -> dict:
    from pdcore.model import native_cpu

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    feats = native_cpu.cpu_features()
    return {
        "model_name": name,
        "isa_flags": [f for f in _ISA_FLAGS if f in feats] or sorted(feats & {"asimd", "bf16"}),
        "kernels": native_cpu.describe(),
    }


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth with torch's threads: best of `repeats` sums over `gib` GiB
    (far past any cache), in GB/s."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return round(x.numel() * 4 / best / 1e9, 2)


def _bytes_per_decode_token(engine, context: float) -> dict:
    """What one batch-1 decode step reads from memory: every weight the layers stream (in
    the format stored: packed bf16/fp32, quantized blocks, or the library's) plus the KV
    cache of `context`
    tokens. Embedding row and norms are negligible and left out."""
    from pdcore.model.quantized import QuantLinear

    model = engine.core.runner.model
    weight_bytes = 0
    for lin in model.streamed_linears():
        if isinstance(lin, QuantLinear):  # --quantization: the packed blocks
            weight_bytes += lin.weight.nbytes
            continue
        weight_bytes += (lin.packed_weights() if lin.is_native_packed() else lin.weight).nbytes
    cfg = model.config
    esize = torch.tensor([], dtype=model.dtype).element_size()
    kv_bytes = int(context * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * esize)
    return {"weights": weight_bytes, "kv": kv_bytes, "total": weight_bytes + kv_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="auto", help="pdcore's dtypes (auto: its default)")
    parser.add_argument("--hf-dtypes", default="float32,bfloat16", help="transformers' dtypes")
    parser.add_argument(
        "--quantizations",
        default="auto",
        help="pdcore's --quantization values, each run with every --dtypes (auto: its default)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument(
        "--prefill-rounds", type=int, default=5, help="alternating prefill rounds per engine"
    )
    parser.add_argument(
        "--roofline-rounds",
        type=int,
        default=5,
        help="(bandwidth, batch-1 decode) pairs for the per-round roofline fractions",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))

    from transformers import AutoModelForCausalLM

    from pdcore.engine.setup import pick_dtype
    from pdcore.model.loader import default_model_path
    from pdcore.model.quantized import QuantLinear
    from pdcore.offline import Engine

    gguf = default_model_path()
    report = {
        "model": gguf.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu": _cpu_info(),
        "read_bandwidth_gb_s_at_start": read_bandwidth_gb_s(),
        "new_tokens": args.new_tokens,
        "pdcore": {},
        "transformers": {},
        "ratios_pdcore_over_best_hf": {},
        "batch1_roofline": {},
    }
    runners: list[Runner] = []
    tokenizer = None
    runs = [(d, q) for q in args.quantizations.split(",") for d in args.dtypes.split(",")]
    for dtype_name, quant in runs:
        engine = Engine(dtype=dtype_name, quantization=quant, max_total_tokens=32768)
        tokenizer = engine.tokenizer
        resolved = str(engine.core.dtype).removeprefix("torch.")
        key = f"{dtype_name} ({resolved})" if dtype_name == "auto" else dtype_name
        if args.quantizations != "auto":
            model = engine.core.runner.model
            held = model.lm_head.weight.label if isinstance(model.lm_head, QuantLinear) else "none"
            key += f", quantization {quant}" + (f" ({held})" if quant == "auto" else "")

        def prompts_for(batch: int, length: int, tok=engine.tokenizer) -> list[list[int]]:
            return _prompts(tok, batch, length)

        runners.append(
            Runner("pdcore", key, functools.partial(_time_pdcore, engine), prompts_for, engine)
        )

    def hf_prompts(batch: int, length: int) -> list[list[int]]:
        return _prompts(tokenizer, batch, length)

    for dtype_name in args.hf_dtypes.split(","):
        dtype = (  # auto: what pdcore would pick here
            pick_dtype(dtype_name, torch.device("cpu"))
            if dtype_name == "auto"
            else getattr(torch, dtype_name)
        )
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype
        ).eval()
        key = str(dtype).removeprefix("torch.")
        runners.append(
            Runner("transformers", key, functools.partial(_time_hf, hf_model), hf_prompts)
        )

    measured = _measure_interleaved(
        runners, args.new_tokens, batches, args.prefill_rounds, args.roofline_rounds
    )
    hf_keys = [r.key for r in runners if r.side == "transformers"]
    for r in runners:
        report[r.side][r.key] = r.result
        if r.side != "pdcore" or "1" not in r.result["decode_tok_s"]:
            continue
        per_token = _bytes_per_decode_token(r.engine, PROMPT_LEN + args.new_tokens / 2)
        bw = measured["bandwidth"][r.key]
        bound = bw * 1e9 / per_token["total"]
        report["batch1_roofline"][r.key] = {
            "read_bandwidth_gb_s": bw,
            "bytes_per_token": per_token,
            "roofline_tok_s": round(bound, 2),
            "measured_tok_s": r.result["decode_tok_s"]["1"],
            "fraction": round(r.result["decode_tok_s"]["1"] / bound, 3),
        }
        per_round = [
            {
                "read_bandwidth_gb_s": rbw,
                "measured_tok_s": tok_s,
                "fraction": round(tok_s * per_token["total"] / (rbw * 1e9), 3),
            }
            for rbw, tok_s in measured["roofline_rounds"][r.key]
        ]
        fractions = sorted(x["fraction"] for x in per_round)
        report["batch1_roofline"][r.key]["rounds"] = per_round
        report["batch1_roofline"][r.key]["median_round_fraction"] = fractions[len(fractions) // 2]
        pair_ratios = sorted(
            min(t[k] for k in hf_keys) / t[r.key] for t in measured["prefill_rounds"]
        )
        r.result["prefill_round_ratios"] = [round(x, 3) for x in pair_ratios]
        r.result["prefill_median_round_ratio"] = round(pair_ratios[len(pair_ratios) // 2], 3)

    hf = report["transformers"].values()
    for key, ours in report["pdcore"].items():
        ratios = {}
        for b, tok_s in ours["decode_tok_s"].items():
            best = max(r["decode_tok_s"][b] for r in hf)
            ratios[f"decode_b{b}"] = round(tok_s / best, 2)
        best_prefill = max(r["prefill_tok_s_512"] for r in hf)
        ratios["prefill_512"] = round(ours["prefill_tok_s_512"] / best_prefill, 2)
        report["ratios_pdcore_over_best_hf"][key] = ratios
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
