"""Incremental detokenization: the concatenated deltas equal the full decode, always."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from engine.testing.tiny_models import CORPUS
from engine.tokenizer import Tokenizer
from router.app.detokenizer import IncrementalDetokenizer, TokenTexts

TEXTS = [
    "emoji 🚀🤖 and CJK 批处理 and Кириллица",
    "héllo wörld — ünïcode façade, naïve café 👩‍👩‍👧",
    "  leading and  double spaces\n\ttabs and\r\nnewlines  ",
    "The KV cache stores keys and values.",
]


def stream(
    tok: Tokenizer, ids: list[int], rng: random.Random, prefix_stable: bool = True
) -> tuple[str, list[str]]:
    """Push ``ids`` in random-sized pieces; return (all text, the deltas).

    With ``prefix_stable`` (byte-level BPE), also check after each push that the text so far
    is a prefix of the decode so far: emitted text is final and made of whole characters.
    """
    detok = IncrementalDetokenizer(tok)
    deltas, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3)
        deltas.append(detok.push(ids[i : i + k]))
        if prefix_stable:
            assert tok.decode(ids[: i + k]).startswith(detok.text)
        i += k
    deltas.append(detok.flush())
    return "".join(deltas), deltas


def sentencepiece_like() -> Tokenizer:
    """A Llama-2-style tokenizer: Metaspace, byte fallback, and a decoder stripping the first
    space, which is what the prefix window exists for."""
    backend = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Byte-fallback pieces must be ordinary vocabulary entries (not special tokens, which
    # decoding skips), so rebuild the model with them added.
    trained = json.loads(backend.to_str())["model"]
    vocab = dict(trained["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    backend.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>")
    return Tokenizer(backend, special_tokens={"eos_token": "</s>"})


@pytest.mark.parametrize("text", TEXTS)
def test_encoded_text_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    rng = random.Random(0)
    for _ in range(5):
        full, _ = stream(tokenizer, ids, rng)
        assert full == tokenizer.decode(ids) == text


def test_random_ids_equal_full_decode(tokenizer: Tokenizer) -> None:
    """Random ids over the whole vocabulary: byte fragments, specials, invalid UTF-8."""
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        full, _ = stream(tokenizer, ids, rng)
        assert full == tokenizer.decode(ids)


def test_random_byte_tokens_equal_full_decode(tokenizer: Tokenizer) -> None:
    """Mostly single-byte tokens (ids 3..258 are the 256 byte symbols) and multibyte text."""
    rng = random.Random(2)
    pieces = [tokenizer.encode(t) for t in ("🚀", "批", "é", "👩‍👧", " a")]
    for _ in range(300):
        ids: list[int] = []
        while len(ids) < 30:
            ids += rng.choice(pieces) if rng.random() < 0.6 else [rng.randrange(3, 259)]
        full, _ = stream(tokenizer, ids, rng)
        assert full == tokenizer.decode(ids)


def test_incomplete_character_is_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🚀")
    assert len(ids) >= 3  # "a" then the rocket's bytes over several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[:1]) == "a"
    for token in ids[1:-1]:
        assert detok.push([token]) == ""
    assert detok.push(ids[-1:]) == "🚀"
    assert detok.flush() == ""


def test_dangling_bytes_are_flushed_as_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🚀")[:2]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids) == ""
    assert detok.flush() == tokenizer.decode(ids) == "\ufffd"


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    ids = [*tokenizer.encode("ab"), 2, *tokenizer.encode(" c")]  # 2 is <|im_end|>
    assert "".join([detok.push(ids), detok.flush()]) == "ab c"


def test_sentencepiece_style_round_trips() -> None:
    tok = sentencepiece_like()
    rng = random.Random(3)
    for text in [*TEXTS, "The first forward pass over the prompt is called prefill."]:
        ids = tok.encode(text, add_special_tokens=False)
        full, deltas = stream(tok, ids, rng, prefix_stable=False)
        assert full == tok.decode(ids) == text
        assert len([d for d in deltas if d]) > 1  # really incremental
    # Random sequences of pieces and whole characters spelled as byte tokens.
    pieces = [tok.encode(t, add_special_tokens=False) for t in ("🚀", "é", "批", " the", "x")]
    bytes_of = [[tok.token_to_id(f"<0x{b:02X}>") or 0 for b in c.encode()] for c in "🚀é批"]
    for _ in range(200):
        mixed: list[int] = []
        while len(mixed) < 25:
            mixed += rng.choice(pieces + bytes_of)
        full, _ = stream(tok, mixed, rng, prefix_stable=False)
        assert full == tok.decode(mixed)


def test_sentencepiece_dangling_bytes() -> None:
    """A byte run cut mid-character: complete characters stay, the rest is U+FFFD."""
    tok = sentencepiece_like()
    rocket = [tok.token_to_id(f"<0x{b:02X}>") or 0 for b in "🚀🤖".encode()]
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push([t]) for t in rocket[:6]) + detok.flush()
    assert text.startswith("🚀") and set(text[1:]) == {"\ufffd"}


def test_token_texts(tokenizer: Tokenizer) -> None:
    texts = TokenTexts(tokenizer)
    the = tokenizer.encode(" the")
    assert len(the) == 1
    assert texts.text(the[0]) == " the" and texts.raw_bytes(the[0]) == list(b" the")
    rocket = tokenizer.encode("🚀")
    raw = b"".join(bytes(texts.raw_bytes(t)) for t in rocket)
    assert raw == "🚀".encode()
    first = texts.text(rocket[0])
    assert first.startswith("bytes:\\x")
    assert texts.text(2) == "<|im_end|>" and texts.raw_bytes(2) == list(b"<|im_end|>")
