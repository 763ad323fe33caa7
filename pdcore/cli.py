"""The `pdcore` command: `serve`, `router`, `launch`, `plugins`, `bench`, `version`.

Each subcommand is a pair of functions -- one adds its arguments, one runs it -- listed in
`_COMMANDS`, so adding a subcommand touches one place. Heavy modules (the server, torch)
are imported inside the function that needs them: `pdcore plugins` and `pdcore version`
stay instant and work where torch is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pdcore.plugins import ALLOW_ENV, PluginError, describe_plugins
from pdcore.settings import build_serve_parser, serve_settings_or_exit, settings_or_exit


def _add_serve(parser: argparse.ArgumentParser) -> None:
    try:
        build_serve_parser(parser)
    except PluginError as exc:  # a broken plugin fails `serve`, not every command
        parser.set_defaults(plugin_error=exc)


def _run_serve(args: argparse.Namespace) -> int:
    if getattr(args, "plugin_error", None) is not None:
        raise args.plugin_error
    # Plugin names (--attention-backend, ...) are checked here, before any model loads.
    settings = serve_settings_or_exit(args, args.subparser)
    from pdcore.server.launch import run_server

    run_server(settings)  # exits non-zero itself when the engine fails
    return 0


def _add_router(parser: argparse.ArgumentParser) -> None:
    from pdcore.router.settings import add_router_arguments

    add_router_arguments(parser)


def _run_router(args: argparse.Namespace) -> int:
    from pdcore.router.settings import RouterSettings

    settings = settings_or_exit(RouterSettings, args, args.subparser)
    from pdcore.router.launch import run_router

    return run_router(settings)


def _add_launch(parser: argparse.ArgumentParser) -> None:
    from pdcore.launch import add_launch_arguments

    add_launch_arguments(parser)


def _run_launch(args: argparse.Namespace) -> int:
    from pdcore.launch import run_launch

    return run_launch(args)


def _add_plugins(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_plugins(args: argparse.Namespace) -> int:
    report = describe_plugins()
    report["allow_list"] = os.environ.get(ALLOW_ENV)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_plugins(report))
    return 1 if report["failed"] or report["errors"] else 0


def format_plugins(report: dict[str, Any]) -> str:
    """Human-readable form of `describe_plugins()`: one block per plugin."""
    lines = []
    width = max([12, *(len(i["name"]) for p in report["plugins"] for i in p["provides"])])
    if report.get("allow_list") is not None:
        lines.append(f"{ALLOW_ENV}={report['allow_list']} (other entry points not loaded)")
    for p in report["plugins"]:
        origin = "built-in" if p["builtin"] else f"{p['package']} {p['version']}"
        lines.append(f"{p['name']} ({origin})")
        for item in p["provides"]:
            kind = item["kind"].replace("_", " ")
            state = (
                item["description"] if item["available"] else f"unavailable \u2014 {item['reason']}"
            )
            lines.append(f"  {kind:<18} {item['name']:<{width}} {state}")
        observers = [h for h in p["hooks"] if not h.startswith("pdcore_register_")]
        if observers:
            lines.append(f"  {'observes':<18} {', '.join(observers)}")
        if not p["provides"] and not observers:
            lines.append("  (registers nothing)")
    for f in report["failed"]:
        lines.append(f"{f['name']} (FAILED TO LOAD: {f['error']})")
    lines.extend(f"error: {e}" for e in report["errors"])
    return "\n".join(lines)


def _add_bench(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    p = sub.add_parser(
        "serving",
        help="load a running server (ours or any OpenAI/SGLang one) and report latencies",
        description="Send many requests to a running server and report throughput, TTFT, "
        "ITL, TPOT, E2E latency and goodput (SGLang bench_serving's metrics).",
        prog="pdcore bench serving",
        allow_abbrev=False,
    )
    from pdcore.bench.config import add_arguments

    add_arguments(p)
    p.set_defaults(bench_parser=p)


def _run_bench(args: argparse.Namespace) -> int:
    from pdcore.bench.serving import main as bench_serving

    return bench_serving(args, args.bench_parser)


def _add_version(parser: argparse.ArgumentParser) -> None:
    pass


def _version() -> str:
    from pdcore import __version__

    return __version__


def _run_version(args: argparse.Namespace) -> int:
    print(f"pdcore {_version()}")
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]
_COMMANDS: list[Command] = [
    ("serve", "run a model server (unified, prefill or decode)", _add_serve, _run_serve),
    ("router", "route requests to prefill/decode server pairs", _add_router, _run_router),
    (
        "launch",
        "start a router, prefill and decode servers on this machine",
        _add_launch,
        _run_launch,
    ),
    ("plugins", "list installed plugins and what they offer", _add_plugins, _run_plugins),
    ("bench", "benchmark a running server: `pdcore bench serving`", _add_bench, _run_bench),
    ("version", "print the pdcore version", _add_version, _run_version),
]


def build_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdcore",
        description="Serve LLMs with prefill/decode disaggregation.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"pdcore {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_arguments, run in _COMMANDS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            usage="%(prog)s [options]",
            allow_abbrev=False,
        )
        add_arguments(p)
        p.set_defaults(run=run, subparser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pdcore` console script; returns the exit status."""
    args = build_cli().parse_args(argv)
    try:
        return int(args.run(args))
    except PluginError as exc:  # a broken plugin: say which, no traceback
        print(f"pdcore {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
