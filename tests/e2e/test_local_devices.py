"""`pdserve local` placing workers on devices: which worker gets which device, memory fraction
and flags (pure, for any number of GPUs), the CLI that builds it, and on the CPU a real
cluster whose prefill and decode workers each got their own flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cluster import cli
from cluster.local import LocalCluster, LocalClusterSpec
from engine.cli import default_model_dir
from tests.e2e.procs import WORKER_FLAGS


def placements(**kw: object) -> list[tuple[str, str | None, tuple[str, ...], bool]]:
    spec = LocalClusterSpec(model_path="m", **kw)  # type: ignore[arg-type]
    return [(p.role, p.device, p.args, p.shares_device) for p in spec.placements()]


FRACTION = "--mem-fraction-static"


def test_one_gpu_is_shared_with_a_memory_fraction_per_role() -> None:
    assert placements(device="cuda", gpu_count=1) == [
        ("prefill", "cuda:0", (FRACTION, "0.4"), True),
        ("decode", "cuda:0", (FRACTION, "0.85"), True),
    ]
    got = placements(device="cuda", gpu_count=1, prefill_mem_fraction_static=0.3,
                     decode_mem_fraction_static=0.9)  # fmt: skip
    assert [p[2] for p in got] == [(FRACTION, "0.3"), (FRACTION, "0.9")]
    # An explicit device holds every worker, shared the same way.
    assert [p[1:] for p in placements(device="cuda:3")] == [
        ("cuda:3", (FRACTION, "0.4"), True),
        ("cuda:3", (FRACTION, "0.85"), True),
    ]


def test_several_gpus_one_per_worker_then_round_robin() -> None:
    assert placements(device="cuda", gpu_count=2) == [
        ("prefill", "cuda:0", (), False),
        ("decode", "cuda:1", (), False),
    ]
    got = placements(device="cuda", gpu_count=3, num_prefill=2, num_decode=2)
    assert [(p[1], p[3]) for p in got] == [("cuda:0", True), ("cuda:1", False),
                                           ("cuda:2", False), ("cuda:0", True)]  # fmt: skip
    # The second worker on cuda:0 (a decode worker) counts the first one's share.
    assert got[0][2] == (FRACTION, "0.4") and got[3][2] == (FRACTION, "0.85")


def test_colocated_cpu_and_unplaced_workers() -> None:
    assert placements(device="cuda", gpu_count=4, colocated=True) == [("null", "cuda:0", (), False)]
    assert placements(device="cpu") == [("prefill", "cpu", (), False),
                                        ("decode", "cpu", (), False)]  # fmt: skip
    assert placements() == [("prefill", None, (), False), ("decode", None, (), False)]


def test_role_flags_follow_the_fraction_so_they_win() -> None:
    got = placements(device="cuda", gpu_count=1, prefill_args=("--chunked-prefill-size", "512"),
                     decode_args=(FRACTION, "0.7"))  # fmt: skip
    assert got[0][2] == (FRACTION, "0.4", "--chunked-prefill-size", "512")
    assert got[1][2] == (FRACTION, "0.85", FRACTION, "0.7")  # argparse keeps the last


def test_bad_placement_values_are_refused() -> None:
    with pytest.raises(ValueError, match="decode_mem_fraction_static must be in"):
        LocalClusterSpec(model_path="m", decode_mem_fraction_static=1.5)
    with pytest.raises(ValueError, match="gpu_count must be >= 1"):
        LocalClusterSpec(model_path="m", gpu_count=0)


def parse_local(
    monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> tuple[argparse.Namespace, list[str]]:
    """What `pdserve local ARGV` hands to the launcher, without starting it."""
    captured = []

    def fake_local(args: argparse.Namespace, extra: list[str]) -> int:
        captured.append((args, extra))
        return 0

    monkeypatch.setattr(cli, "_local", fake_local)
    assert cli.main(["local", *argv]) == 0
    return captured[0]


def test_cli_builds_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [
        "--model-path",
        "/m",
        "--device",
        "cuda",
        "--page-size",
        "1",
        "--prefill-args",
        "--chunked-prefill-size 64 --random-seed 3",
        "--decode-mem-fraction-static",
        "0.8",
    ]
    args, extra = parse_local(monkeypatch, argv)
    spec = cli.local_spec(args, extra)
    assert spec.device == "cuda" and spec.decode_mem_fraction_static == 0.8
    # On GPUs the hand-off defaults to cuda_ipc; every other unknown flag goes to all workers.
    assert spec.engine_args == ("--page-size", "1", "--transfer-backend", "cuda_ipc")
    assert spec.prefill_args == ("--chunked-prefill-size", "64", "--random-seed", "3")
    argv = ["--model-path", "/m", "--device", "cuda", "--transfer-backend", "mooncake"]
    args, extra = parse_local(monkeypatch, argv)
    assert cli.local_spec(args, extra).engine_args == ("--transfer-backend", "mooncake")
    args, extra = parse_local(
        monkeypatch, ["--model-path", "/m", "--device", "cuda", "--colocated"]
    )
    assert cli.local_spec(args, extra).engine_args == ()
    args, extra = parse_local(monkeypatch, ["--model-path", "/m"])
    assert cli.local_spec(args, extra).device is None
    # One flag alone, written with '=': the decode worker's, not the launcher's.
    args, extra = parse_local(monkeypatch, ["--model-path", "/m", "--decode-args=--ep-size 2"])
    assert cli.local_spec(args, extra).decode_args == ("--ep-size", "2")
    args, extra = parse_local(monkeypatch, ["--decode-args=--disable-radix-cache"])
    assert cli.local_spec(args, extra).decode_args == ("--disable-radix-cache",)


def test_cli_without_a_gpu_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    if _has_gpu():
        pytest.skip("this host has a GPU")
    assert cli.main(["local", "--model-path", "/m", "--device", "cuda"]) == 2
    assert "no GPU is visible" in capsys.readouterr().err


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_each_role_gets_its_own_flags(tmp_path: Path) -> None:
    """Real workers on the CPU: the prefill worker's pool is sized by its own flag, the
    decode worker's by its own, as their ready lines say."""
    spec = LocalClusterSpec(
        model_path=str(default_model_dir()),
        port=0,  # the router picks a free one (a port chosen here can be taken by a worker)
        engine_args=WORKER_FLAGS,  # --max-total-tokens 4096 for both ...
        device="cpu",
        prefill_args=("--max-total-tokens", "1024"),  # ... but this one for the prefill
        log_dir=str(tmp_path),
    )
    with LocalCluster(spec) as cluster:
        pages = {c.name: c.ready["kv_pages"] for c in cluster.children if c.ready.get("role")}
    assert pages == {"prefill-0": 1024 // 16, "decode-1": 4096 // 16}
