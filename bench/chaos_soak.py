"""The chaos soak: >= 10 minutes and >= 5,000 requests through `pdcore router` in front of
2 prefill + 2 decode real `pdcore serve` processes (tiny random Llama, nixl), with
concurrent streaming clients that cancel at random moments and a random fault every 40-90 s
(kill -9 + restart of P1 or D1, SIGSTOP + SIGCONT of any instance), then the invariants of
docs/reliability.md (pdcore/testing/chaos.py). P0 and D0 are never killed, so their RSS over
the whole run is compared with their RSS after warm-up.

    python bench/chaos_soak.py                      # ~12 minutes; writes the two files below
    python bench/chaos_soak.py --duration 60 --min-requests 300 --out /tmp/s.json --png ''

Writes docs/chaos_soak.json (the report, with the RSS and quarantine samples over time) and
docs/chaos_soak_rss.png (each instance's RSS over the run, faults marked). Exits 1 when an
invariant failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdcore.testing.chaos import ChaosConfig, random_faults, run_chaos  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model folder (default: a tiny random Llama built here)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of chaos, at least")
    p.add_argument("--min-requests", type=int, default=5000)
    p.add_argument("--clients", type=int, default=32, help="concurrent streams")
    p.add_argument("--cancel-fraction", type=float, default=0.3)
    p.add_argument("--fault-every", type=float, nargs=2, default=(40.0, 90.0))
    p.add_argument("--backend", default="nixl")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workdir", type=Path, help="logs (default: a temp folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "chaos_soak.json")
    p.add_argument("--png", default=str(ROOT / "docs" / "chaos_soak_rss.png"))
    p.add_argument("--replot", type=Path, help="only draw --png from this report JSON")
    return p.parse_args()


def plot(data: dict[str, Any], path: Path) -> None:
    """Each instance's RSS over the chaos phase (from the report's samples), faults marked:
    every server at full scale, the never-restarted ones zoomed, the router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in data["samples"] if "rss_mib" in s]
    names = sorted({n for s in samples for n in s["rss_mib"]})
    restarted = set(data["rss_mib"]["restarted"])
    fig, (full, kept, router) = plt.subplots(
        3, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]}
    )
    for i, name in enumerate(names):
        pts = [(s["t_s"], s["rss_mib"][name]) for s in samples if s["rss_mib"].get(name)]
        xs, ys = [t for t, _ in pts], [v for _, v in pts]
        style = {"label": name, "lw": 1.2, "color": f"C{i}"}
        if name == "router":
            router.plot(xs, ys, **style)
            continue
        full.plot(xs, ys, **style)
        if name not in restarted:
            kept.plot(xs, ys, **style)
    for f in data["faults"]:
        color = "tab:red" if f["kind"] == "kill9" else "tab:orange"
        for ax in (full, kept, router):
            ax.axvline(f["at_s"], color=color, ls=":", lw=0.8)
        label = f"{'kill' if f['kind'] == 'kill9' else 'stop'} {f['target']}"
        full.annotate(
            label,
            (f["at_s"], 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="bottom",
            ha="right",
        )
    r, d = data["requests"], data["durations_s"]
    full.set_title(
        f"chaos soak: 2P2D behind the router, {r['total']} requests in {d['chaos']:.0f} s "
        f"({r['ok']} ok, {r['error']} errors, {r['cancelled']} cancelled), "
        f"{len(data['faults'])} faults",
        fontsize=9,
    )
    full.set_ylabel("RSS, server + engine (MiB)")
    kept.set_ylabel("never restarted (MiB)")
    router.set_ylabel("router (MiB)")
    router.set_xlabel("seconds into the chaos phase (red: kill -9 + restart, orange: SIGSTOP)")
    for ax in (full, kept, router):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    args = parse()
    if args.replot:
        plot(json.loads(args.replot.read_text()), Path(args.png))
        return 0
    model = args.model
    if model is None:
        from tests.tiny_models import build_tiny_llama

        model = str(build_tiny_llama(Path(tempfile.mkdtemp(prefix="tiny-llama-"))))
    rng = random.Random(args.seed)
    faults = random_faults(
        rng,
        args.duration,
        tuple(args.fault_every),
        {"kill9": ["P1", "D1"], "stop": ["P0", "P1", "D0", "D1"]},
    )
    cfg = ChaosConfig(
        model=model,
        prefills=2,
        decodes=2,
        backend=args.backend,
        clients=args.clients,
        requests=args.min_requests,
        duration_s=args.duration,
        max_duration_s=args.duration * 3,
        cancel_fraction=args.cancel_fraction,
        faults=faults,
        seed=args.seed,
        sample_interval_s=10.0,
        workdir=args.workdir,
        progress=lambda m: print(m, flush=True),
    )
    t = time.monotonic()
    report = run_chaos(cfg)
    print(f"done in {time.monotonic() - t:.0f} s")
    data = json.loads(report.to_json())
    data["planned_faults"] = [vars(f) for f in faults]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    if args.png:
        plot(data, Path(args.png))
    summary = {k: data[k] for k in ("requests", "durations_s", "violations")}
    summary["rss_growth"] = data["rss_mib"]["growth"]
    summary["faults"] = len(report.faults)
    print(json.dumps(summary, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
