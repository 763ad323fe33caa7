"""Per-request sampling parameters, validated once at the edge so the engine never sees bad values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Fields SGLang's router or clients add that change nothing for us; accepted and dropped.
_IGNORED_FIELDS = frozenset(
    {
        "n",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "no_stop_trim",
        "separate_reasoning",
        "stream_reasoning",
        "custom_params",
        "logit_bias",
        "json_schema",
        "regex",
        "ebnf",
        "structural_tag",
        "sampling_seed",
    }
)


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid; `param` names it so the HTTP layer can report it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any] | None, defaults: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """Build and validate from a JSON object (SGLang's `sampling_params`).

        `defaults` (the model's, see `pdcore.model.generation_defaults`) fill the fields the
        object leaves unset or null; a value the object gives always wins.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SamplingParamsError("sampling_params", "sampling_params must be an object")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k in known}
        for key, value in data.items():
            if key in known:
                if value is not None:
                    kwargs[key] = value
            elif key == "max_completion_tokens" or key == "max_tokens":
                if value is not None:
                    kwargs["max_new_tokens"] = value
            elif key == "stop_sequences":
                kwargs["stop"] = value
            elif key not in _IGNORED_FIELDS:
                raise SamplingParamsError(key, f"unknown sampling parameter '{key}'")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first bad field."""
        _check_int(self, "max_new_tokens", minimum=0)
        _check_int(self, "min_new_tokens", minimum=0)
        _check_int(self, "top_k", minimum=-1, maximum=_MAX_ID)
        if self.top_k == 0:
            raise SamplingParamsError("top_k", "top_k must be -1 (disabled) or >= 1")
        _check_float(self, "temperature", low=0.0)
        _check_float(self, "top_p", low=0.0, high=1.0, low_open=True)
        _check_float(self, "min_p", low=0.0, high=1.0)
        _check_float(self, "repetition_penalty", low=0.0, low_open=True)
        _check_float(self, "frequency_penalty", low=-2.0, high=2.0)
        _check_float(self, "presence_penalty", low=-2.0, high=2.0)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise SamplingParamsError("seed", "seed must be an integer")
        if self.seed is not None and not -_MAX_SEED <= self.seed <= _MAX_SEED:
            # torch takes 64-bit seeds, and the sampler adds the output position to it.
            raise SamplingParamsError("seed", f"seed must be within +-{_MAX_SEED}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError("stop", "stop must be a non-empty string or a list of them")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _MAX_ID
            for t in self.stop_token_ids
        ):
            raise SamplingParamsError(
                "stop_token_ids", "stop_token_ids must be a list of token ids"
            )
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be a boolean")


# Bounds that keep values inside what the sampler's int64 tensors and torch's seeds hold
# (found by fuzzing: top_k=10**30 or a 70-bit seed raised inside the engine's step).
_MAX_ID = 2**31 - 1
_MAX_SEED = 2**62


def _check_int(params: SamplingParams, name: str, minimum: int, maximum: int | None = None) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"{name} must be an integer, got {_short(value)}")
    if value < minimum:
        raise SamplingParamsError(name, f"{name} must be >= {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise SamplingParamsError(name, f"{name} must be <= {maximum}, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_float(
    params: SamplingParams,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(name, f"{name} must be a number, got {_short(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float (10**400): found by fuzzing
        raise SamplingParamsError(name, f"{name} must be a finite number") from None
    setattr(params, name, value)
    if value != value:  # NaN
        raise SamplingParamsError(name, f"{name} must be a number, got NaN")
    if value in (float("inf"), float("-inf")):  # inf temperature: NaN probabilities
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise SamplingParamsError(name, f"{name} must be {op} {low}, got {value}")
    if high is not None and value > high:
        raise SamplingParamsError(name, f"{name} must be <= {high}, got {value}")
