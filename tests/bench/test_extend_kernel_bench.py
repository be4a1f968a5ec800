"""bench/extend_kernel.py on the CPU under Triton's interpreter: a row per tile configuration,
the fastest marked, each configuration's output within float32 rounding of SDPA's."""

from __future__ import annotations

import pytest

from bench import extend_kernel


def test_table_rows(capsys: pytest.CaptureFixture[str]) -> None:
    extend_kernel.main(["--device", "cpu", "--dtype", "float32", "--heads", "4/2/32", "--cases",
                        "2x40+8", "--tiles", "16x16x4x1,32x16x4x2", "--reps", "1"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if "| 2x40+8 |" in line]
    assert [r.split("|")[3].strip().rstrip("*<") for r in rows] == ["16x16x4x1", "32x16x4x2"]
    assert sum("<" in r for r in rows) == 1
    assert all(float(r.split("|")[9]) < 1e-5 for r in rows)  # max err against SDPA


def test_case_flops_count_the_causal_pairs() -> None:
    case = extend_kernel.Case.parse("2x3+4")
    assert (case.batch, case.new, case.prefix, str(case)) == (2, 3, 4, "2x3+4")
    # Each sequence: queries see 5, 6 and 7 keys; 2 (Dk + Dv) Hq FLOPs a pair.
    assert case.flops(hq=2, dk=8, dv=8) == 2 * (5 + 6 + 7) * 2 * 16 * 2
