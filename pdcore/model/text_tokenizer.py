"""The model's tokenizer as the server and the engine use it, without torch or transformers'
tokenizer classes where the folder allows it.

`pdcore serve` needs five things from a tokenizer: encode, decode, the special token ids,
the vocabulary size and the chat template. transformers' `AutoTokenizer` provides them but
importing it costs ~5 s of CPU (torch included) in every process that loads it -- the HTTP
frontend and the engine both did, on every server start. When the folder's tokenizer is
the generic one (`tokenizer_class` "TokenizersBackend" or "PreTrainedTokenizerFast": a
tokenizer.json used verbatim, as transformers itself then does), `TextTokenizer` reads the
same tokenizer.json with HF `tokenizers` (the Rust library transformers wraps) and renders
chat templates with transformers' own renderer (`transformers.utils.chat_template_utils`,
which imports no torch), so ids, text and prompts are the ones transformers gives
(tests/test_text_tokenizer.py compares them). Any other tokenizer class may rebuild its
pipeline in Python, so those folders keep `AutoTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdcore.model.loader import resolve_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Tokenizer classes whose transformers implementation uses tokenizer.json as it is.
_VERBATIM_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
_REBUILDING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space")
# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES),
# the keywords a chat template sees.
_SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json writes it
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_templates(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The folder's chat template(s), where transformers looks for them: tokenizer_config's
    "chat_template" (one, or a list of named ones), chat_template.jinja (wins), and
    additional_chat_templates/NAME.jinja."""
    found: dict[str, str] = {}
    template = config.get("chat_template")
    if isinstance(template, str):
        found["default"] = template
    elif isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                found[str(entry.get("name"))] = entry["template"]
    if (folder / "chat_template.jinja").is_file():
        found["default"] = (folder / "chat_template.jinja").read_text()
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            found[file.stem] = file.read_text()
    if not found:
        return None
    if list(found) == ["default"]:
        return found["default"]
    return found


class TextTokenizer:
    """tokenizer.json through HF `tokenizers`, with transformers' chat-template rendering;
    the subset of transformers' tokenizer API that pdcore uses, with the same results."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        special: dict[str, str],
        chat_template: str | dict[str, str] | None,
    ) -> None:
        self._tokenizer = tokenizer
        self.special_tokens_map = special
        self.chat_template = chat_template
        self.bos_token_id = self._id(special.get("bos_token"))
        self.eos_token_id = self._id(special.get("eos_token"))
        self.pad_token_id = self._id(special.get("pad_token"))

    @property
    def has_post_processor(self) -> bool:
        return self._tokenizer.post_processor is not None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @classmethod
    def load(cls, folder: Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        config = json.loads((folder / "tokenizer_config.json").read_text())
        special: dict[str, str] = {}
        for name in _SPECIAL_NAMES:
            text = _token_text(config.get(name))
            if text is not None:
                special[name] = text
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(tokenizer, special, _chat_templates(folder, config))

    def __len__(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int] | int, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text, as transformers' `apply_chat_template(..., tokenize=False)`."""
        from transformers.utils.chat_template_utils import (
            _normalize_chat_messages,
            render_jinja_template,
        )

        if tokenize:
            raise ValueError("TextTokenizer.apply_chat_template renders text only")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation.")
        template = self.chat_template
        if isinstance(template, dict):
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template:
                raise ValueError(f"no default chat template among {sorted(template)}")
            template = template[name]
        if template is None:
            raise ValueError("this tokenizer has no chat template")
        render: Any = render_jinja_template  # annotated "-> str"; returns (texts, indices)
        rendered, _ = render(
            conversations=[_normalize_chat_messages(conversation)],
            tools=tools,
            documents=documents,
            chat_template=template,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return str(rendered[0])


def verbatim_tokenizer_folder(folder: Path) -> bool:
    """Whether transformers would use the folder's tokenizer.json as it is."""
    config_file = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config_file.is_file():
        return False
    if (folder / "special_tokens_map.json").is_file():  # merged by rules of its own
        return False
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("tokenizer_class") not in _VERBATIM_CLASSES:
        return False
    # Settings transformers applies on top of tokenizer.json (it rebuilds the
    # post-processor for add_bos_token / add_eos_token): leave those to it.
    return not any(key in config for key in _REBUILDING_KEYS)


def load_text_tokenizer(model_path: str | None, tokenizer_path: str | None = None) -> Any:
    """The model's tokenizer for serving: a `TextTokenizer` where the folder allows it,
    transformers' `AutoTokenizer` otherwise (same API subset, same results)."""
    folder = Path(tokenizer_path) if tokenizer_path else resolve_model(model_path).folder
    if verbatim_tokenizer_folder(folder):
        tokenizer = TextTokenizer.load(folder)
        if tokenizer.has_post_processor:  # else transformers writes one of its own
            return tokenizer
    from pdcore.model.tokenizer import load_tokenizer

    return load_tokenizer(model_path, tokenizer_path)
