"""pdcore's serving tokenizer (HF `tokenizers` + transformers' chat renderer) gives what
transformers' AutoTokenizer gives, and the HTTP frontend process imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdcore.model.text_tokenizer import (
    TextTokenizer,
    load_text_tokenizer,
    verbatim_tokenizer_folder,
)
from pdcore.model.tokenizer import load_tokenizer

TEXTS = [
    "The capital of France is",
    "Hello <|im_start|> world<|im_end|> and <|endoftext|>",
    "  leading spaces\n\ttabs and trailing  ",
    "émoji 🎉 中文 — ünïcödé",
    "",
    "def f(x):\n    return x ** 2  # square",
]
CHATS = [
    [{"role": "user", "content": "Capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again", "name": None},
    ],
]


@pytest.fixture(scope="module")
def pair() -> tuple[TextTokenizer, object]:
    ours = load_text_tokenizer(None)
    assert isinstance(ours, TextTokenizer)  # the default model's folder takes the light path
    return ours, load_tokenizer(None)


def test_encode_decode_and_special_ids_equal_transformers(pair) -> None:
    ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(
                text, add_special_tokens=special
            ), (text, special)
    ids = hf.encode(" ".join(TEXTS)) + [0, 1, 2, len(hf) - 1]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
        for token in ids:
            assert ours.decode([token], skip_special_tokens=skip) == hf.decode(
                [token], skip_special_tokens=skip
            )
    assert len(ours) == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)


def test_chat_template_renders_as_transformers(pair) -> None:
    ours, hf = pair
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False
            ) == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    with pytest.raises(ValueError):
        ours.apply_chat_template([], add_generation_prompt=True)


def test_other_tokenizer_classes_keep_autotokenizer(tmp_path: Path, pair) -> None:
    """A tokenizer class transformers may rebuild in Python is not read verbatim."""
    _, hf = pair
    hf.save_pretrained(str(tmp_path))
    assert verbatim_tokenizer_folder(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for change in ({"tokenizer_class": "LlamaTokenizer"}, {"add_bos_token": True}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert not verbatim_tokenizer_folder(tmp_path), change
        assert not isinstance(load_text_tokenizer(None, str(tmp_path)), TextTokenizer), change


def test_the_http_frontend_imports_no_torch(tiny_llama_dir: Path) -> None:
    """`pdcore serve`'s HTTP process only checks flags and spawns the engine: torch and
    transformers' tokenizer classes stay out of it (each cost seconds of CPU per server
    start), for the default GGUF and for an HF folder alike."""
    code = (
        "import sys, pdcore.cli, pdcore.server.launch; "
        "from pdcore.settings import parse_serve_args; "
        "from pdcore.model.text_tokenizer import load_text_tokenizer; load_text_tokenizer(None); "
        f"parse_serve_args(['--model-path', {str(tiny_llama_dir)!r}]); "
        f"load_text_tokenizer({str(tiny_llama_dir)!r}); parse_serve_args([]); "
        f"parse_serve_args(['--model-path', {str(tiny_llama_dir)!r}, '--tp-size', '2']); "
        f"parse_serve_args(['--model-path', {str(tiny_llama_dir)!r}, '--pp-size', '2']); "
        "heavy = sorted(m for m in ('torch', 'transformers.tokenization_utils_base') "
        "if m in sys.modules); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
