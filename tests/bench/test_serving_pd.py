"""bench.serving_pd's generated tokenizer: every id a dummy model can sample decodes to text."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from bench.serving_pd import write_word_tokenizer


def test_every_id_of_the_vocabulary_decodes_to_a_word_that_encodes_back(tmp_path: Path) -> None:
    write_word_tokenizer(tmp_path, 128256)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 128256
    ids = [0, 1, 4095, 128000, 128255]
    text = tok.decode(ids)
    assert text == "w0 w1 w4095 w128000 w128255"
    assert tok.encode(text).ids == ids
    assert (tmp_path / "tokenizer_config.json").exists()
