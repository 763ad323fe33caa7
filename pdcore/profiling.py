"""Phase profiling (--profile-prefill / --profile-decode): torch profiler traces of the
forward passes of one phase, written as Chrome-trace JSON that Perfetto opens.

Why per phase: in PD mode each side runs only one phase, and in unified mode the question
is usually "what does a decode step cost" or "what does a prefill chunk cost" — a trace of
every step of a busy server would be mostly the other phase. The profiler starts at the
first forward pass of the chosen phase and stops after `--profile-num-steps` passes of that
phase, then writes one trace file per phase. Passes of the other phase that happen in
between are in the trace too, each labelled by its phase, so nothing is hidden.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from pdcore.settings_base import PdcoreSettings, setting

logger = logging.getLogger(__name__)

PHASES = ("prefill", "decode")


class ProfileSettings(PdcoreSettings):
    """Profiling flags, with SGLang's names (SGLANG_PROFILE_PREFILL / _DECODE work too)."""

    profile_prefill: bool = setting(
        False,
        "Record a torch profiler trace of prefill forward passes (Perfetto-readable JSON).",
        env_aliases=["SGLANG_PROFILE_PREFILL"],
    )
    profile_decode: bool = setting(
        False,
        "Record a torch profiler trace of decode forward passes (Perfetto-readable JSON).",
        env_aliases=["SGLANG_PROFILE_DECODE"],
    )
    profile_dir: str = setting(
        "pdcore-profiles",
        "Directory the profile traces are written to (created when missing).",
        env_aliases=["SGLANG_TORCH_PROFILER_DIR"],
    )
    profile_num_steps: int = setting(
        5, "Forward passes of the chosen phase recorded per trace.", gt=0
    )


def _phase_of(is_decode: bool) -> str:
    return "decode" if is_decode else "prefill"


class PhaseProfiler:
    """Wraps each forward pass; records the chosen phases and writes their traces.

    One torch profiler runs at a time (torch allows no nesting), so when both phases are
    chosen they are recorded one after the other: prefill first, since a server sees a
    prefill before any decode.
    """

    def __init__(
        self, phases: list[str], out_dir: str | Path, num_steps: int, *, tag: str = ""
    ) -> None:
        self.pending = [p for p in PHASES if p in phases]
        self.out_dir = Path(out_dir)
        self.num_steps = num_steps
        self.tag = tag or f"pid{os.getpid()}"
        self.written: list[Path] = []
        self._active: Any = None
        self._active_phase: str | None = None
        self._recorded = 0

    @classmethod
    def from_settings(cls, settings: Any, *, tag: str = "") -> PhaseProfiler | None:
        phases = [p for p in PHASES if getattr(settings, f"profile_{p}", False)]
        if not phases:
            return None
        return cls(phases, settings.profile_dir, settings.profile_num_steps, tag=tag)

    @property
    def done(self) -> bool:
        return not self.pending and self._active is None

    def step(self, is_decode: bool, num_seqs: int, num_tokens: int) -> AbstractContextManager:
        """Context manager around one forward pass (and its sampling)."""
        phase = _phase_of(is_decode)
        if self._active is None and self.pending and self.pending[0] == phase:
            self._start(phase)
        if self._active is None:
            return nullcontext()
        return _Step(self, phase, num_seqs, num_tokens)

    def _start(self, phase: str) -> None:
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        import torch

        if torch.cuda.is_available():
            activities.append(tp.ProfilerActivity.CUDA)
        self._active = tp.profile(activities=activities, record_shapes=True, with_stack=False)
        self._active.start()
        self._active_phase = phase
        self._recorded = 0
        logger.info("profiling %s: recording %d forward passes", phase, self.num_steps)

    def _after_step(self, phase: str) -> None:
        if phase != self._active_phase:
            return
        self._recorded += 1
        if self._recorded >= self.num_steps:
            self.finish()

    def finish(self) -> None:
        """Stop and write the running trace (also called at shutdown for a partial one)."""
        if self._active is None:
            return
        prof, phase = self._active, self._active_phase
        self._active, self._active_phase = None, None
        assert phase is not None  # set together with _active
        self.pending.remove(phase)
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{phase}-{self.tag}-{int(time.time())}.trace.json"
        prof.export_chrome_trace(str(path))
        self.written.append(path)
        logger.info("profile of %d %s passes written to %s", self._recorded, phase, path)


class _Step:
    def __init__(self, owner: PhaseProfiler, phase: str, num_seqs: int, num_tokens: int) -> None:
        self.owner = owner
        self.phase = phase
        self.label = f"pdcore.{phase}[seqs={num_seqs},tokens={num_tokens}]"
        self._fn: Any = None

    def __enter__(self) -> _Step:
        import torch.autograd.profiler as ap

        self._fn = ap.record_function(self.label)
        self._fn.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._fn.__exit__(*exc)
        self.owner._after_step(self.phase)
