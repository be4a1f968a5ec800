"""bench/grammar.py end to end on a small synthetic vocabulary: the table's rows and columns,
and numbers that are real timings (positive)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import grammar


def test_grammar_bench_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    grammar.main(["--vocab-size", "2048", "--batch-sizes", "1,4", "--steps", "3",
                  "--warmup", "1", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "synthetic byte-level vocabulary of 2048" in printed and "cache hit" in printed
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert all(r[k] > 0 for k in ("fill_ms", "accept_ms", "apply_cpu_ms")), r


def test_synthetic_vocabulary_is_byte_level() -> None:
    tok = grammar.synthetic_tokenizer(1000)
    assert tok.vocab_size == 1000 and tok.eos_token_id is not None
    info = grammar.GrammarBackend(tok, 1024, tok.eos_token_ids, grammar.torch.device("cpu"))
    decoded = info.tokenizer_info().decoded_vocab
    assert decoded[tok.token_to_id("Ġ") or 0] == b" "  # byte-level symbols decode to bytes
