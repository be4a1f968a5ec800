"""The generated Python beside the .proto files must be what `make proto` writes now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted((ROOT / "protos").glob("*.proto"))
    assert protos, "no .proto files found"
    (tmp_path / "protos").mkdir()
    for proto in protos:
        shutil.copy(proto, tmp_path / "protos" / proto.name)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", *(f"protos/{p.name}" for p in protos)],
        cwd=tmp_path,
        check=True,
    )  # fmt: skip
    stale = []
    for generated in sorted((tmp_path / "protos").glob("*_pb2*.py*")):
        committed = ROOT / "protos" / generated.name
        if not committed.is_file() or committed.read_text() != generated.read_text():
            stale.append(generated.name)
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
