"""Tokenizers behind one small interface: a transformers tokenizer, or bytes for random models."""

from __future__ import annotations

from typing import Any


class HFTokenizer:
    """A transformers tokenizer seen through `encode` / `decode` without special tokens."""

    kind = "hf"

    def __init__(self, tok: Any, *, eos_id: int | None = None, bos_id: int | None = None) -> None:
        self.tok = tok
        self.eos_id: int | None = eos_id if eos_id is not None else tok.eos_token_id
        self.bos_id: int | None = bos_id if bos_id is not None else tok.bos_token_id
        cleans = getattr(tok, "clean_up_tokenization_spaces", True)
        self._backend = None if cleans else getattr(tok, "_tokenizer", None)
        self._skipped = frozenset(tok.all_special_ids)
        self._size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        # Streaming decodes a short window per token per row: transformers' wrapper costs ~5x
        # the Rust decode it ends in, so call that directly where the wrapper would add
        # nothing (no clean-up of tokenization spaces).
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True)

    def adds_text(self, token: int) -> bool:
        """False for ids `decode` drops whatever surrounds them (special tokens, and ids
        beyond the vocabulary a model may pad its embedding to)."""
        return token not in self._skipped and 0 <= token < self._size

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tok, "chat_template", None) or None

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt of a conversation (its chat template, then the assistant's turn)."""
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)
        return list(out["input_ids"])


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258), for random-weight models that ship no tokenizer.

    Random weights make the text's meaning irrelevant; this keeps every pipeline stage runnable.
    """

    kind = "bytes"
    bos_id = 1
    eos_id = 2
    offset = 3
    chat_template = None

    def __init__(self, vocab: int) -> None:
        if vocab < 256 + self.offset:
            raise ValueError(f"byte tokenizer needs a vocabulary of at least 259, got {vocab}")

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def adds_text(self, token: int) -> bool:
        """False for ids with no byte (`decode` drops them)."""
        return self.offset <= token < 256 + self.offset

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")


Tokenizer = HFTokenizer | ByteTokenizer
