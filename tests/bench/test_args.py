"""bench/args.py: the integer-list argument type every benchmark takes."""

from __future__ import annotations

import argparse

import pytest

from bench.args import int_list


def test_int_list() -> None:
    assert int_list("1,4, 16,") == (1, 4, 16)
    assert int_list("0,2", minimum=0) == (0, 2)
    for bad, minimum in (("", 1), ("0,2", 1), ("-1", 0), ("1,x", 1), ("2.5", 1)):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad, minimum)
