"""Token ids back to text, incrementally, without ever splitting a UTF-8 character.

A byte-level tokenizer may spread one character over several tokens; decoding a prefix then
ends in U+FFFD. ``IncrementalDetokenizer`` holds such text back until the character is
complete, and decodes only a short window (vLLM's prefix/read offsets) so that a long
generation costs O(tokens), not O(tokens²). Its contract: the concatenation of every
``push`` delta and the final ``flush`` equals ``tokenizer.decode(all_ids)`` exactly, with one
exception: a byte-fallback (SentencePiece) decoder turns a byte run that ends mid-character
into U+FFFDs as a whole, so a sequence that stops there keeps the run's complete characters,
already streamed, followed by U+FFFD for the dangling bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of one growing token sequence. Not thread-safe; one per choice."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        # ids[prefix:read] decode to prefix_text, the tail of text already emitted; read is a
        # character boundary, so decode(ids[prefix:]) starts with prefix_text.
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = ""  # None: not decoded yet
        self._emitted: list[str] = []
        # The decode of every id, when the last emit decoded them all: (how many, text).
        self._whole: tuple[int, str] = (-1, "")

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now complete (possibly empty)."""
        self._ids.extend(token_ids)
        new_text = self._decode(self._ids[self._prefix :])
        prefix_text = self._prefix_text
        if prefix_text is None:  # the window moved at the last emit; its text is due now
            prefix_text = self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        if (
            len(new_text) > len(prefix_text)
            and not new_text.endswith(REPLACEMENT)
            and new_text.startswith(prefix_text)
        ):
            delta = new_text[len(prefix_text) :]
            if self._prefix == 0:
                self._whole = (len(self._ids), new_text)
            # Slide the window; its prefix text is decoded only if another push comes.
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = None
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """The sequence is over: return the held-back rest (incomplete bytes become U+FFFD)."""
        whole = self._whole
        full = whole[1] if whole[0] == len(self._ids) else self._decode(self._ids)
        emitted = self.text
        if full.startswith(emitted):
            delta = full[len(emitted) :]
        else:
            # Byte-fallback decoders turn a whole byte run into U+FFFDs when it ends mid
            # character, so the full decode no longer starts with the run's complete
            # characters, already sent. Send the replacement of the dangling part only.
            window = self._decode(self._ids[self._prefix :])
            prefix_text = self._prefix_text
            if prefix_text is None:
                prefix_text = self._decode(self._ids[self._prefix : self._read])
            if window.startswith(prefix_text):
                delta = window[len(prefix_text) :]
            else:
                delta = self._decode(self._ids[self._read :])
        self._emitted.append(delta)
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)


class TokenTexts:
    """Per-token strings and bytes for OpenAI's logprobs, cached per id.

    ``text`` is the token's decoded text, or ``"bytes:\\xe6\\x89"`` (as OpenAI writes it) for a
    token that is only part of a UTF-8 character; ``raw_bytes`` is the token's exact bytes.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def raw_bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            entry = self._compute(token_id)
            if len(self._cache) < 1 << 18:
                self._cache[token_id] = entry
        return entry

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        if REPLACEMENT not in text:
            return text, list(text.encode())
        raw = _token_bytes(self._tokenizer.id_to_token(token_id))
        if raw is None:
            return text, list(text.encode())
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(piece: str | None) -> bytes | None:
    """The bytes a vocabulary entry stands for: byte-level BPE or SentencePiece byte fallback."""
    if piece is None:
        return None
    match = _SENTENCEPIECE_BYTE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    table = _unicode_to_byte()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return None


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}
