"""Tools for plugin authors: the transfer-backend conformance kit. Also the load/chaos
harness for a whole PD deployment, `pdcore.testing.chaos` (docs/reliability.md).

`run_conformance("NAME")` returns a ConformanceReport (one CheckResult per check);
`conformance_test("NAME")` is the same as a parametrized pytest test, for a plugin's own
suite. Nothing in pdcore's serving path imports this package.
"""

from __future__ import annotations

from typing import Any

from pdcore.testing.report import CHECKS, CheckResult, ConformanceReport

__all__ = ["CHECKS", "CheckResult", "ConformanceReport", "conformance_test", "run_conformance"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m pdcore.testing.conformance` does not import its module twice.
    if name in ("run_conformance", "conformance_test"):
        from pdcore.testing import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
