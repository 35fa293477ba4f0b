"""Text in and out through the checkpoint's `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

TOKENIZER = "tokenizer.json"


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / TOKENIZER).is_file()


def _load(path: str | Path):
    from tokenizers import Tokenizer

    if not has_tokenizer(path):
        raise ValueError(f"{Path(path) / TOKENIZER} not found, so --prompt cannot be encoded; "
                         f"give token ids with --prompt-ids instead")
    return Tokenizer.from_file(str(Path(path) / TOKENIZER))


def encode(path: str | Path, text: str) -> tuple[int, ...]:
    """`text` -> token ids, with the special tokens the tokenizer adds (e.g. BOS)."""
    ids = tuple(_load(path).encode(text).ids)
    if not ids:
        raise ValueError(f"--prompt {text!r} encodes to no tokens; give a non-empty prompt")
    return ids


def decode(path: str | Path, ids: Sequence[int]) -> str:
    return _load(path).decode(list(ids), skip_special_tokens=True)
