"""Greedy tokens from Hugging Face transformers: the correctness reference for pdcore."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

# (id of the model, prompt ids, eos ids) -> (max_new_tokens asked, tokens generated). Greedy
# decoding is deterministic, so a shorter request is a prefix of a longer one; every parity
# test in a session reuses the same reference instead of re-running generate().
_GREEDY_MEMO: dict[tuple, tuple[int, list[int]]] = {}
_MEMO_MODELS: dict[int, object] = {}  # keeps each memoized model alive, so its id is never reused

# Eight prompts of different lengths, shared by the engine and server parity tests.
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "1, 2, 3, 4,",
    "Hello",
    "def fibonacci(n):",
    "List three colours:",
    "Once upon a time, in a land far away, there lived a king who had three daughters and",
    "Q: What is 2+2?\nA:",
]


def load_hf_model(model_path: str | None):
    """transformers' own loading of the same weights (the GGUF via gguf_file=, or the HF folder).

    Loaded once per test session and path: transformers needs ~35 s to read the default
    model's GGUF on a 2-core machine, and seven test modules compare against it.
    """
    from pdcore.model.loader import default_model_path

    return _load_hf_model(str(Path(model_path) if model_path else default_model_path()))


@lru_cache(maxsize=8)
def _load_hf_model(model_path: str):
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if path.suffix == ".gguf":
        return _load_hf_gguf(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _load_hf_gguf(path: Path):
    """transformers' load of a GGUF (its own dequantization), kept as transformers saves
    it: the first load in any process writes `save_pretrained`'s fp32 folder, later ones
    (the other pytest worker, later runs) read that folder -- the same tensors, in ~1 s
    instead of the ~34 s transformers spends parsing the GGUF. Keyed by the file and the
    transformers and torch versions; a lock makes the second worker wait for the first."""
    import fcntl
    import hashlib
    import shutil
    import tempfile

    import transformers
    from transformers import AutoModelForCausalLM

    from pdcore.model.loader import cache_root

    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:"
        f"{transformers.__version__}:{torch.__version__}".encode()
    ).hexdigest()[:16]
    folder = cache_root() / "hf-reference" / f"{path.stem}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder.parent))
        try:
            # save_pretrained refuses a GGUF-loaded model (its hf_quantizer); the tensors
            # are plain fp32 after transformers' dequantization, so save them as they are.
            from safetensors.torch import save_model

            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(config))
            save_model(model, str(tmp / "model.safetensors"))
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return model


def hf_greedy(
    model, prompts_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int]
) -> list[list[int]]:
    """One generate() per prompt (no padding), stopping at eos like pdcore does."""
    outputs = []
    with torch.inference_mode():
        for ids in prompts_ids:
            _MEMO_MODELS[id(model)] = model
            key = (id(model), tuple(ids), tuple(eos_ids))
            asked, tokens = _GREEDY_MEMO.get(key, (0, []))
            if asked >= max_new_tokens or (asked and len(tokens) < asked):
                outputs.append(tokens[:max_new_tokens])
                continue
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )
            tokens = out[0, len(ids) :].tolist()
            _GREEDY_MEMO[key] = (max_new_tokens, tokens)
            outputs.append(tokens)
    return outputs
