"""Rows to samples: validate one chunk of rows of a row shape and tokenize it in batches.

Row shapes (one per import; docs/data.md):
    pretrain  `text` (or pre-tokenized `input_ids`)       loss on every token
    sft       `prompt` + `completion`                      loss on the completion
    chat      `messages` (+ optional `tools`; the chat template) loss on assistant turns
    dpo       `prompt` + `chosen` + `rejected`             two samples, one pair
    grpo      `prompt` + `completions` + `rewards`         one sample per completion, one group

String prompts are tokenized with the tokenizer's special tokens (its post-processor's
BOS), completions without, and followed by EOS when the tokenizer names one (`add_eos`).
A prompt given as a list of messages (TRL's conversational form) goes through the chat
template: the completion's rendering after the prompt's generation prompt carries the loss.

GRPO advantages are normalised per group here, at import: A = (r - mean) / (std + eps) with
the population std and eps = ADVANTAGE_EPS, the same as workers.objectives.group_advantages,
so a loader recomputing them from the stored raw rewards gets the same numbers.

Errors: the first bad row of a chunk, in row order, raises RowError naming the file, the
row (from 1; JSONL also gives its line) and the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.dataset_meta import KIND_CODE, ROLE_CODE, meta_records
from scheduler.errors import DatasetError
from scheduler.tokenizer import (
    ChatTemplateError,
    HFTokenizer,
    Tokenizer,
    chat_spans,
    prompt_completion_spans,
    span_mask,
)

ADVANTAGE_EPS = 1e-6
SHAPES = {  # detection order: the first shape whose fields a row has
    "chat": ("messages",),
    "dpo": ("prompt", "chosen", "rejected"),
    "grpo": ("prompt", "completions", "rewards"),
    "sft": ("prompt", "completion"),
    "pretrain": ("text",),
}


class RowError(DatasetError):
    """A bad input row; the message names the file, the row and the field."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: its file, its row number from 1 and (JSONL) its line."""

    file: str
    row: int
    line: int | None = None

    def at(self) -> str:
        where = f"{self.file}: row {self.row}"
        return where if self.line is None else f"{where} (line {self.line})"

    def error(self, name: str, problem: str) -> RowError:
        return RowError(f"{self.at()}: field {name!r}: {problem}")


def detect_kind(fields: Sequence[str]) -> str | None:
    """The row shape a set of field names makes, or None."""
    names = set(fields)
    for kind, need in SHAPES.items():
        if set(need) <= names:
            return kind
    return "pretrain" if "input_ids" in names else None


def shape_help() -> str:
    return "; ".join(f"{k}: {' + '.join(v)}" for k, v in SHAPES.items()) + \
        " (or input_ids for pretrain)"


@dataclass
class _Piece:
    """Part of a sample: text to tokenize (or ids), whether it carries the loss."""

    text: str | None = None
    ids: np.ndarray | None = None
    special: bool = False  # tokenize with the tokenizer's special tokens (BOS)
    loss: bool = False
    eos: bool = False  # append EOS after it

    def token_ids(self) -> np.ndarray:
        assert self.ids is not None, "a piece is tokenized (or given as ids) before it is joined"
        return self.ids


@dataclass
class _Draft:
    """One sample before tokenization."""

    ref: RowRef
    field: str  # the field its loss comes from (named in errors)
    kind: str
    # `field` names the attribute above, so the dataclasses function is spelled in full
    pieces: list[_Piece] = dataclasses.field(default_factory=list)
    chat: tuple[str, list[tuple[int, int]]] | None = None  # rendered text, loss spans
    pair: int = -1
    role: str | None = None
    group: int = -1
    reward: float = math.nan
    advantage: float = math.nan
    ids: np.ndarray | None = None
    mask: np.ndarray | None = None

    def encoded(self) -> tuple[np.ndarray, np.ndarray]:
        """ids and loss mask, which _tokenize sets on every draft."""
        assert self.ids is not None and self.mask is not None, "_tokenize ran"
        return self.ids, self.mask


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk's samples, ready for DatasetWriter.add_encoded (pair/group ids chunk-local)."""

    tokens: np.ndarray  # uint32[T]
    mask: np.ndarray  # uint8[T]
    lengths: np.ndarray  # int64[n]
    records: np.ndarray  # META_DTYPE[n]
    num_rows: int
    num_pairs: int
    num_groups: int


class ChunkEncoder:
    """Validates and tokenizes chunks of one row shape (see the module doc)."""

    def __init__(self, tokenizer: Tokenizer, *, kind: str, column: str | None = None,
                 add_eos: bool = True):
        if kind not in KIND_CODE:
            raise DatasetError(f"kind={kind!r} is not known; valid: {', '.join(KIND_CODE)}")
        self.tok, self.kind, self.column, self.add_eos = tokenizer, kind, column, add_eos
        self._pairs = self._groups = 0

    def encode(self, rows: list[tuple[RowRef, object]]) -> EncodedChunk:
        self._pairs = self._groups = 0
        drafts, pending = [], None
        for ref, row in rows:
            try:
                drafts += self._draft(ref, row)
            except RowError as exc:
                pending = exc
                break
        self._tokenize(drafts)
        self._check(drafts)
        if pending is not None:
            raise pending
        return self._assemble(drafts, len(rows))

    # -- validation: one row -> drafts ---------------------------------------------------

    def _draft(self, ref: RowRef, row: object) -> list[_Draft]:
        if not isinstance(row, dict):
            raise RowError(f"{ref.at()} is a {type(row).__name__}, not an object")
        missing = [f for f in self._fields(row) if f not in row or row[f] is None]
        if missing:
            raise ref.error(missing[0], f"is missing (a {self.kind} row needs "
                            f"{' + '.join(self._fields(row))}; columns: {sorted(row)})")
        return getattr(self, f"_draft_{self.kind}")(ref, row)

    def _fields(self, row: dict) -> tuple[str, ...]:
        if self.kind != "pretrain":
            return SHAPES[self.kind]
        if self.column:
            return (self.column,)
        return ("input_ids",) if "input_ids" in row else ("text",)

    def _draft_pretrain(self, ref: RowRef, row: dict) -> list[_Draft]:
        name = self._fields(row)[0]
        value = row[name]
        if isinstance(value, str):
            if not value:
                raise ref.error(name, "is an empty string")
            return [_Draft(ref, name, "pretrain",
                           [_Piece(text=value, special=True, loss=True, eos=self.add_eos)])]
        return [_Draft(ref, name, "pretrain", [_Piece(ids=self._ids(ref, name, value),
                                                        loss=True)])]

    def _ids(self, ref: RowRef, name: str, value) -> np.ndarray:
        limit = self.tok.vocab_size if isinstance(self.tok, HFTokenizer) else 2**32
        if not isinstance(value, list) or not value or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit
                for t in value):
            raise ref.error(name, f"must be a non-empty list of token ids in [0, {limit}) or "
                            "a non-empty string")
        return np.asarray(value, dtype=np.uint32)

    def _draft_sft(self, ref: RowRef, row: dict) -> list[_Draft]:
        prompt = self._prompt(ref, row)
        completion = self._completion(ref, "completion", row["completion"], prompt)
        return [self._sample(ref, "completion", "sft", prompt, completion)]

    def _draft_dpo(self, ref: RowRef, row: dict) -> list[_Draft]:
        prompt = self._prompt(ref, row)
        pair = self._pairs
        self._pairs += 1
        out = []
        for role in ("chosen", "rejected"):
            d = self._sample(ref, role, "dpo", prompt,
                             self._completion(ref, role, row[role], prompt))
            d.pair, d.role = pair, role
            out.append(d)
        return out

    def _draft_grpo(self, ref: RowRef, row: dict) -> list[_Draft]:
        prompt = self._prompt(ref, row)
        completions, rewards = row["completions"], row["rewards"]
        if not isinstance(completions, list) or not completions:
            raise ref.error("completions", "must be a non-empty list (one group's completions)")
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            got = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
            raise ref.error("rewards", f"must be a list of {len(completions)} numbers (one per "
                            f"completion), got {got}")
        for j, r in enumerate(rewards):
            if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r):
                raise ref.error(f"rewards[{j}]", f"must be a finite number, got {r!r}")
        group, adv = self._groups, group_advantages(np.asarray(rewards, dtype=np.float64))
        self._groups += 1
        out = []
        for j, c in enumerate(completions):
            d = self._sample(ref, f"completions[{j}]", "grpo", prompt,
                             self._completion(ref, f"completions[{j}]", c, prompt))
            d.group, d.reward, d.advantage = group, float(rewards[j]), float(adv[j])
            out.append(d)
        return out

    def _draft_chat(self, ref: RowRef, row: dict) -> list[_Draft]:
        messages = self._messages(ref, "messages", row["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise ref.error("messages", "has no assistant turn (the loss is on assistant "
                            "turns only)")
        tools = row.get("tools")
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, dict) for t in tools)):
            raise ref.error("tools", "must be a list of JSON-schema objects (or absent)")
        rendered = self._render(ref, "messages", lambda tok: chat_spans(tok, messages, tools))
        return [_Draft(ref, "messages", "chat", chat=rendered)]

    def _prompt(self, ref: RowRef, row: dict):
        prompt = row["prompt"]
        if isinstance(prompt, list):
            return self._messages(ref, "prompt", prompt)
        if not isinstance(prompt, str):
            raise ref.error("prompt", f"must be a string or a list of messages, got "
                            f"{type(prompt).__name__}")
        return prompt

    def _completion(self, ref: RowRef, name: str, value, prompt):
        if isinstance(prompt, list):  # conversational: a string is one assistant message
            if isinstance(value, str):
                value = [{"role": "assistant", "content": value}]
            messages = self._messages(ref, name, value)
            if not any(str(m.get("content") or "").strip() for m in messages):
                raise ref.error(name, "is empty")
            return messages
        if not isinstance(value, str):
            raise ref.error(name, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ref.error(name, "is empty")
        return value

    def _messages(self, ref: RowRef, name: str, value) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise ref.error(name, "must be a non-empty list of {role, content} messages")
        for j, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ref.error(f"{name}[{j}]", "must be an object with a string 'role'")
            if not isinstance(m.get("content"), str | list | None):
                raise ref.error(f"{name}[{j}].content", "must be a string, a list of parts "
                                f"or null, got {type(m.get('content')).__name__}")
        return value

    def _sample(self, ref: RowRef, name: str, kind: str, prompt, completion) -> _Draft:
        if isinstance(prompt, list):
            rendered = self._render(ref, name,
                                    lambda tok: prompt_completion_spans(tok, prompt, completion))
            return _Draft(ref, name, kind, chat=rendered)
        return _Draft(ref, name, kind, [_Piece(text=prompt, special=True),
                                        _Piece(text=completion, loss=True, eos=self.add_eos)])

    def _render(self, ref: RowRef, name: str, fn):
        if not isinstance(self.tok, HFTokenizer):
            raise ref.error(name, "messages need --tokenizer (a model directory with a chat "
                            "template); the byte tokenizer has none")
        try:
            return fn(self.tok)
        except ChatTemplateError as exc:
            raise ref.error(name, str(exc)) from None

    # -- tokenization and checks ---------------------------------------------------------

    def _tokenize(self, drafts: list[_Draft]) -> None:
        for special in (True, False):
            pieces = [p for d in drafts for p in d.pieces if p.text is not None
                      and p.special == special]
            if pieces:
                texts = [p.text for p in pieces if p.text is not None]  # all of them
                encoded = self.tok.encode_batch(texts, add_special_tokens=special)
                for p, ids in zip(pieces, encoded, strict=True):
                    p.ids = ids
        chats = [(d, d.chat) for d in drafts if d.chat is not None]
        if chats:
            for (d, (_, spans)), (ids, offsets) in zip(chats, self.tok.encode_with_offsets(
                    [text for _, (text, _) in chats]), strict=True):
                d.ids, d.mask = ids, span_mask(offsets, spans)
        for d in drafts:
            if d.chat is None:
                d.ids, d.mask = self._join(d.pieces)

    def _join(self, pieces: list[_Piece]) -> tuple[np.ndarray, np.ndarray]:
        """A sample's ids and mask from its tokenized pieces (plus EOS where asked)."""
        ids = [p.token_ids() for p in pieces]
        mask = [np.full(i.size, p.loss, dtype=np.uint8) for i, p in zip(ids, pieces, strict=True)]
        eos, last, last_ids = self.tok.eos_id, pieces[-1], ids[-1]
        if last.eos and eos is not None and (not last_ids.size or last_ids[-1] != eos):
            ids.append(np.array([eos], dtype=np.uint32))
            mask.append(np.array([last.loss], dtype=np.uint8))
        return np.concatenate(ids), np.concatenate(mask)

    def _check(self, drafts: list[_Draft]) -> None:
        for k, d in enumerate(drafts):
            ids, mask = d.encoded()
            if ids.size == 0:
                raise d.ref.error(d.field, "tokenizes to no tokens")
            if d.kind != "pretrain" and not mask[1:].any():
                raise d.ref.error(d.field, "leaves no token that carries a loss (a loss token "
                                  "needs a token before it: give a prompt, or a tokenizer "
                                  "that adds BOS)")
            if d.role == "rejected" and np.array_equal(ids, drafts[k - 1].encoded()[0]):
                raise d.ref.error("rejected", "tokenizes to the same ids as 'chosen' (a DPO "
                                  "pair must differ)")

    def _assemble(self, drafts: list[_Draft], num_rows: int) -> EncodedChunk:
        rec = meta_records(len(drafts))
        encoded = [d.encoded() for d in drafts]
        for j, d in enumerate(drafts):
            rec[j]["kind"] = KIND_CODE[d.kind]
            rec[j]["role"] = ROLE_CODE[d.role] if d.role else 0
            rec[j]["pair_id"], rec[j]["group_id"] = d.pair, d.group
            rec[j]["reward"], rec[j]["advantage"] = d.reward, d.advantage
            rec[j]["num_loss_tokens"] = int(encoded[j][1][1:].sum())
        empty = np.zeros(0, dtype=np.uint32)
        return EncodedChunk(
            tokens=np.concatenate([ids for ids, _ in encoded]) if drafts else empty,
            mask=np.concatenate([m for _, m in encoded]) if drafts else empty.astype(np.uint8),
            lengths=np.array([ids.size for ids, _ in encoded], dtype=np.int64), records=rec,
            num_rows=num_rows, num_pairs=self._pairs, num_groups=self._groups)


def group_advantages(rewards: np.ndarray, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """(r - mean) / (std + eps) over one group (population std; a group of one gets 0)."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()) / (r.std() + eps)
