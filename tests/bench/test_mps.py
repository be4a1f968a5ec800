"""bench/mps.py and `bench.serving_pd --mps` without a GPU: a stand-in control program records
what it is asked, so the daemon's start, its environment in the workers' and its stop on every
path are checked; and a missing program is one line that says what to install."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import mps, serving, serving_pd
from cluster.local import LocalClusterSpec

FAKE = """#!/bin/sh
cmd="$*"
[ -z "$cmd" ] && cmd=$(cat)
echo "$cmd|$CUDA_MPS_PIPE_DIRECTORY|$CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_CALLS"
[ "$cmd" = "-d" ] && { echo "${FAKE_MPS_SAYS:-}"; exit "${FAKE_MPS_D_RC:-0}"; }
exit 0
"""


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in nvidia-cuda-mps-control first on PATH; the file its calls go to, one line
    each: `command|pipe dir|log dir`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / mps.CONTROL
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "calls.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_CALLS", str(record))
    return record


def lines(record: Path) -> list[list[str]]:
    return [line.split("|") for line in record.read_text().splitlines()]


def test_the_daemon_runs_for_the_block_and_its_clients_get_its_directories(
    calls: Path, tmp_path: Path
) -> None:
    with mps.mps_daemon(tmp_path / "logs") as env:
        pipe = env["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir() and len(pipe) < 60  # a socket lives there: short path
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str((tmp_path / "logs").resolve())
        assert [c[0] for c in lines(calls)] == ["-d", "get_server_list"]
    made = lines(calls)
    assert [c[0] for c in made] == ["-d", "get_server_list", "quit"]
    # Every call, the stop too, spoke to this daemon: its pipe and log directories.
    assert all(c[1:] == [pipe, env["CUDA_MPS_LOG_DIRECTORY"]] for c in made)
    assert not Path(pipe).exists()


def test_the_daemon_is_stopped_when_the_block_fails(calls: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), mps.mps_daemon(tmp_path / "logs"):
        raise RuntimeError("boom")
    assert [c[0] for c in lines(calls)] == ["-d", "get_server_list", "quit"]


def test_a_daemon_that_does_not_start_is_one_line_with_the_fix(
    calls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MPS_D_RC", "1")
    monkeypatch.setenv("FAKE_MPS_SAYS", "An instance of this daemon is already running")
    with pytest.raises(mps.MPSUnavailable) as caught, mps.mps_daemon(tmp_path / "logs"):
        pytest.fail("the block ran without a daemon")
    message = str(caught.value)
    assert "\n" not in message
    assert "already running" in message and "run without --mps" in message
    assert [c[0] for c in lines(calls)] == ["-d"]  # nothing to stop


def test_a_missing_program_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control anywhere
    argv = ["--model-path", str(tmp_path), "--mps", "--out-dir", str(tmp_path / "out")]
    assert serving_pd.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert mps.CONTROL in err[0] and "install the NVIDIA driver's utilities" in err[0]
    assert not (tmp_path / "out").exists()  # it failed before any work


def fake_serving(argv: list[str], probe: serving.RunProbe | None = None) -> int:
    """bench.serving's stand-in: one run's figures, as compare() reads them, and what the
    probe around it adds."""
    run: dict[str, Any] = {"request_rate": "inf", "goodput": 1.0}
    for key in ("ttft_ms", "itl_ms"):
        run[key] = {"p50": 1.0, "p99": 2.0}
    if probe is not None:
        run.update(probe()())
    Path(argv[argv.index("--output-file") + 1]).write_text(json.dumps({"runs": [run]}))
    return 0


def test_serving_pd_runs_only_the_disaggregated_mode_under_mps(
    calls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs: list[LocalClusterSpec] = []

    def cluster(spec: LocalClusterSpec) -> contextlib.nullcontext[SimpleNamespace]:
        specs.append(spec)  # and start nothing: no process to scrape
        return contextlib.nullcontext(SimpleNamespace(metrics={}))

    monkeypatch.setattr(serving_pd, "LocalCluster", cluster)
    monkeypatch.setattr(serving_pd.serving, "main", fake_serving)
    out = tmp_path / "out"
    argv = ["--model-path", str(tmp_path), "--mps", "--request-rates", "inf",
            "--out-dir", str(out), "--decode-env", "CUDA_MPS_CLIENT_PRIORITY=1"]  # fmt: skip
    assert serving_pd.main(argv) == 0
    colocated, disaggregated = specs
    assert dict(colocated.env) == {}
    pipe = disaggregated.env["CUDA_MPS_PIPE_DIRECTORY"]
    assert disaggregated.child_env()["CUDA_MPS_PIPE_DIRECTORY"] == pipe  # the workers see it
    assert disaggregated.child_env("decode")["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert "CUDA_MPS_CLIENT_PRIORITY" not in disaggregated.child_env("prefill")
    assert disaggregated.env["CUDA_MPS_LOG_DIRECTORY"] == str((out / "mps-logs").resolve())
    assert [c[0] for c in lines(calls)] == ["-d", "get_server_list", "quit"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mps"] == {"colocated": False, "disaggregated": True}
    assert summary["runs"]["disaggregated"][0]["phases_ms"]["decode_pickup"] is None


def test_cluster_children_get_the_spec_environment_over_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PDSERVE_TEST_VAR", "from-parent")
    spec = LocalClusterSpec(model_path="m", env={"PDSERVE_TEST_VAR": "from-spec", "X": "1"})
    env = spec.child_env()
    assert env["PDSERVE_TEST_VAR"] == "from-spec" and env["X"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == os.environ["PATH"]
    assert LocalClusterSpec(model_path="m").child_env()["PDSERVE_TEST_VAR"] == "from-parent"
    # A role's own variables win over both, for that role's workers only.
    spec = LocalClusterSpec(model_path="m", env={"X": "1"}, decode_env={"X": "2", "D": "3"},
                            prefill_env={"P": "4"})  # fmt: skip
    assert spec.child_env("decode")["X"] == "2" and spec.child_env("decode")["D"] == "3"
    assert spec.child_env("prefill")["P"] == "4" and "D" not in spec.child_env("prefill")
    for kind in (None, "worker", "router"):
        assert spec.child_env(kind)["X"] == "1" and "D" not in spec.child_env(kind)
    with pytest.raises(SystemExit):  # argparse: not NAME=VALUE
        serving_pd.main(["--model-path", "m", "--decode-env", "NOVALUE"])
