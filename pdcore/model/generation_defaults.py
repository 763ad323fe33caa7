"""The sampling defaults a model asks for (`--sampling-defaults model`, SGLang's flag).

A request that leaves temperature / top_p / top_k / min_p / repetition_penalty unset gets
the model's own values, read from

- an HF folder's generation_config.json: only the keys the file itself sets (transformers'
  GenerationConfig class defaults, e.g. top_k=50, are not the model's request);
- a .gguf's `general.sampling.*` metadata (temp, top_p, top_k, min_p, penalty_repeat);
- for the default model, which has neither, its model card's recommendation
  (`pdcore.model.loader.DEFAULT_MODEL_SAMPLING`).

`do_sample` is not read: as in SGLang and vLLM a request that wants greedy decoding says
temperature 0. With `--sampling-defaults openai` nothing is read and the OpenAI defaults
(temperature 1, top_p 1) apply. Reads small files and metadata only, never weights.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdcore.model.gguf_header import read_gguf_header
from pdcore.model.loader import DEFAULT_MODEL_SAMPLING, ModelNotFoundError, default_model_path

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GENERATION_CONFIG = "generation_config.json"
_GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


@dataclass(frozen=True)
class GenerationDefaults:
    """The defaults a request's unset sampling fields take, and where they came from."""

    params: dict[str, float | int] = field(default_factory=dict)
    source: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {"params": dict(self.params), "source": self.source}


OPENAI_DEFAULTS = GenerationDefaults(
    {}, "openai: temperature 1.0, top_p 1.0, top_k -1, min_p 0.0, repetition_penalty 1.0"
)


def sampling_defaults(mode: str, model_path: str | None) -> GenerationDefaults:
    """What `--sampling-defaults MODE` means for this model: "openai" or "model"."""
    if mode == "openai":
        return OPENAI_DEFAULTS
    if mode != "model":
        raise ValueError(f"--sampling-defaults must be 'model' or 'openai', got {mode!r}")
    return model_generation_defaults(model_path)


def model_generation_defaults(model_path: str | None) -> GenerationDefaults:
    """The model's own sampling defaults (empty when it states none)."""
    path = Path(model_path).expanduser() if model_path else default_model_path()
    if path.is_dir():
        file = path / GENERATION_CONFIG
        if not file.exists():
            return GenerationDefaults({}, f"none ({path} has no {GENERATION_CONFIG})")
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring %s: %s", file, exc)
            return GenerationDefaults({}, f"none ({file} is not valid JSON)")
        if not isinstance(data, dict):
            return GenerationDefaults({}, f"none ({file} is not a JSON object)")
        return GenerationDefaults(_checked(data, str(file)), str(file))
    if path.is_file() and path.suffix == ".gguf":
        try:
            params = _checked(_gguf_sampling(path), str(path))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read sampling metadata of %s: %s", path, exc)
            params = {}
        if params:
            return GenerationDefaults(params, f"{path} (GGUF general.sampling.*)")
        if _is_default_model(path):
            return GenerationDefaults(
                dict(DEFAULT_MODEL_SAMPLING),
                "model card of HuggingFaceTB/SmolLM2-135M-Instruct (the default model ships "
                "no generation config)",
            )
        return GenerationDefaults({}, f"none ({path} has no general.sampling.* metadata)")
    raise ModelNotFoundError(f"--model-path {path} does not exist")


def _is_default_model(path: Path) -> bool:
    try:
        return path.resolve() == default_model_path().resolve()
    except ModelNotFoundError:
        return False


def _gguf_sampling(path: Path) -> dict[str, Any]:
    """The `general.sampling.*` values of a GGUF's metadata (the key/value header only)."""
    metadata = read_gguf_header(path, _GGUF_KEYS, with_tensors=False).metadata
    return {_GGUF_KEYS[key]: value for key, value in metadata.items()}


def _checked(data: dict[str, Any], where: str) -> dict[str, float | int]:
    """The sampling keys `data` sets, as our SamplingParams understands them; a value out of
    range is logged and skipped (the request's own default then applies)."""
    out: dict[str, float | int] = {}
    for key in SAMPLING_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            logger.warning("ignoring %s=%r in %s: not a number", key, value, where)
            continue
        ok = {
            "temperature": value >= 0,
            "top_p": 0 < value <= 1,
            "top_k": value >= -1 and float(value).is_integer(),
            "min_p": 0 <= value <= 1,
            "repetition_penalty": value > 0,
        }[key]
        if not ok:
            logger.warning("ignoring %s=%r in %s: out of range", key, value, where)
            continue
        if key == "top_k":
            # HF and llama.cpp spell "no top-k" as 0; SamplingParams as -1.
            out[key] = -1 if int(value) == 0 else int(value)
        else:
            out[key] = float(value)
    return out
