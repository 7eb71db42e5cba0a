"""Tokenizers for the importer: a Hugging Face model directory, a bare tokenizer.json, or bytes.

A model directory is read the way `transformers` reads it, from local files only: the
`tokenizers` pipeline in tokenizer.json (normaliser, pre-tokenizer, model, post-processor:
the latter decides BOS), the special tokens of tokenizer_config.json, and its chat template
(`chat_template` in tokenizer_config.json, or chat_template.jinja). Templates render with
transformers' own Jinja environment (`transformers.utils.chat_template_utils`, which does
not import torch), so a conversation renders exactly as `apply_chat_template` renders it. A
directory without tokenizer.json (a slow SentencePiece tokenizer only) is converted by
`transformers.AutoTokenizer` (that path imports torch). Without a tokenizer, text becomes
its UTF-8 bytes (vocab 256, no special tokens): the importer's historic behaviour.

Assistant masks (`chat_spans`): when the template marks generated text with
`{% generation %}`, those spans are the loss; otherwise they come from the template's own
rendering of prefixes: for each assistant turn k, render(messages[:k], generation prompt)
must be a prefix of render(messages[:k+1]), which must be a prefix of the whole rendering;
the characters between the two are turn k's loss span (its content and whatever the
template emits after it: end-of-turn tokens, separators). Templates that rewrite earlier
turns (e.g. drop past reasoning) fail that check and are reported, never guessed at.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scheduler.errors import DatasetError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as TokenizerBackend

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")


class ChatTemplateError(DatasetError):
    """A conversation the template cannot render, or renders inconsistently."""


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); no special tokens, no chat template."""

    name = "bytes"
    vocab_size = 256
    eos_id: int | None = None
    chat_template: str | None = None

    def describe(self) -> dict:
        return {"type": "bytes", "vocab_size": 256}

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32)
                for t in texts]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        raise ChatTemplateError("messages rows need --tokenizer (a model directory with a "
                                "chat template); the byte tokenizer has none")


@dataclass(eq=False)
class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its directory."""

    backend: TokenizerBackend
    path: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.name = self.path
        self.vocab_size = int(self.backend.get_vocab_size(with_added_tokens=True))
        eos = self.special_tokens.get("eos_token")
        self.eos_id = self.backend.token_to_id(eos) if eos else None
        self.generation_markers = bool(self.chat_template
                                       and _GENERATION_TAG.search(self.chat_template))

    def describe(self) -> dict:
        return {"type": "huggingface", "path": self.path, "vocab_size": self.vocab_size,
                "eos_token": self.special_tokens.get("eos_token"),
                "chat_template": self.chat_template is not None}

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[np.ndarray]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [np.asarray(e.ids, dtype=np.uint32)
                for e in encode(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, char offsets int64[T, 2]) of rendered chats (no special tokens added)."""
        out = []
        for e in self.backend.encode_batch(texts, add_special_tokens=False):
            offs = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            out.append((np.asarray(e.ids, dtype=np.uint32), offs))
        return out

    def render(self, messages: list, *, add_generation_prompt: bool, markers: bool = False,
               tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The template's rendering (and its generation spans when `markers`)."""
        if self.chat_template is None:
            raise ChatTemplateError(f"the tokenizer at {self.path} has no chat template "
                                    "(tokenizer_config.json 'chat_template' or "
                                    "chat_template.jinja)")
        from transformers.utils import chat_template_utils

        # Annotated "-> str" in transformers, it returns (rendered texts, generation spans).
        render_jinja_template: Callable[..., Any] = chat_template_utils.render_jinja_template
        try:
            texts, spans = render_jinja_template(
                conversations=[messages], tools=tools, chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=markers, **self.special_tokens)
        except Exception as exc:  # the template is user code: any failure is the data's
            raise ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}") \
                from None
        return texts[0], [tuple(s) for s in (spans[0] if markers else [])]


Tokenizer = ByteTokenizer | HFTokenizer


def chat_spans(tok: HFTokenizer, messages: list, tools: list[dict] | None = None
               ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans that carry the loss); see the module doc."""
    if tok.generation_markers:
        return tok.render(messages, add_generation_prompt=False, markers=True, tools=tools)
    full, _ = tok.render(messages, add_generation_prompt=False, tools=tools)
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prefix, _ = tok.render(messages[:k], add_generation_prompt=True, tools=tools)
        upto, _ = tok.render(messages[:k + 1], add_generation_prompt=False, tools=tools)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise ChatTemplateError(
                f"the chat template does not render message {k} as an extension of the "
                "messages before it (it rewrites earlier turns), so the assistant mask cannot "
                "be derived from prefixes; add {% generation %} markers to the template")
        if len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
    return full, spans


def prompt_completion_spans(tok: HFTokenizer, prompt: list, completion: list
                            ) -> tuple[str, list[tuple[int, int]]]:
    """Conversational prompt + completion: the completion's rendering carries the loss."""
    head, _ = tok.render(prompt, add_generation_prompt=True)
    full, _ = tok.render(prompt + completion, add_generation_prompt=False)
    if not full.startswith(head):
        raise ChatTemplateError("the chat template does not render prompt + completion as "
                                "an extension of the prompt with its generation prompt")
    return full, [(len(head), len(full))]


def span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8[T]: 1 for every token whose characters overlap a span (what transformers does)."""
    mask = np.zeros(offsets.shape[0], dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask.astype(np.uint8)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_config(directory: Path) -> tuple[dict[str, str], str | None]:
    path = directory / "tokenizer_config.json"
    config = {}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not JSON ({exc})") from None
    special = {k: t for k in _SPECIAL_KEYS if (t := _token_text(config.get(k)))}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name", "template"}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text()
    return special, template if isinstance(template, str) else None


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """A tokenizer from a model directory or tokenizer.json (None: UTF-8 bytes)."""
    if path is None:
        return ByteTokenizer()
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"--tokenizer {path}: not found (a model directory with "
                           "tokenizer.json / tokenizer_config.json, or a tokenizer.json file)")
    file = path if path.is_file() else path / "tokenizer.json"
    directory = path.parent if path.is_file() else path
    special, template = _read_config(directory) if path.is_dir() else ({}, None)
    if file.exists():
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise DatasetError(f"{file}: not a readable tokenizer.json ({exc})") from None
    elif (directory / "tokenizer_config.json").exists():
        backend = _convert_slow(directory)
    else:
        raise DatasetError(f"--tokenizer {path}: holds neither tokenizer.json nor "
                           "tokenizer_config.json")
    return HFTokenizer(backend=backend, path=str(path), special_tokens=special,
                       chat_template=template)


def _convert_slow(directory: Path):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable directories
        raise DatasetError(f"--tokenizer {directory}: transformers cannot load it "
                           f"({type(exc).__name__}: {exc})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DatasetError(f"--tokenizer {directory}: no fast tokenizer available")
    return backend
