"""deploy/Dockerfile: base images cannot be pulled here, so this checks what can be checked
without building: the file parses, its variants are the ones deploy/k8s runs, it installs
with the Makefile's own `make install` and the Makefile's variables, it copies every package
the project ships, and the checkpoint it bakes in is the one the CPU manifests point at."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import tomllib
import yaml
from dockerfile_parse import DockerfileParser

from engine.cli import DEFAULT_MODEL_FAMILY

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def parsed() -> DockerfileParser:
    parser = DockerfileParser(path=str(DOCKERFILE))
    parser.content = DOCKERFILE.read_text()
    return parser


def instructions(kind: str) -> list[str]:
    return [i["value"] for i in parsed().structure if i["instruction"] == kind]


def test_parses_with_a_base_image_argument() -> None:
    structure = parsed().structure
    first = [i["instruction"] for i in structure if i["instruction"] != "COMMENT"]
    assert first[:2] == ["ARG", "FROM"], first  # the base image is a build argument
    assert instructions("FROM") == ["${BASE_IMAGE}"]
    args = {v.split("=", 1)[0] for v in instructions("ARG")}
    assert {"BASE_IMAGE", "TORCH_SPEC", "TORCH_INDEX", "MOONCAKE_SPEC", "EXTRAS"} <= args
    assert "USER" in first and instructions("USER") == ["1000"]
    assert shlex.split(instructions("CMD")[0].strip("[]").replace(",", " "))[0] == "pdserve"


def test_variants_are_the_images_the_overlays_run() -> None:
    header = DOCKERFILE.read_text().split("\nARG ", 1)[0]
    built = set(re.findall(r"docker build -f deploy/Dockerfile -t (pdserve:\w+)", header))
    used = set()
    for overlay in (ROOT / "deploy" / "k8s" / "overlays").iterdir():
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        [image] = kustomization["images"]
        used.add(f"{image['newName']}:{image['newTag']}")
    assert built == used == {"pdserve:cpu", "pdserve:cuda", "pdserve:ascend"}
    assert "--build-arg EXTRAS=npu" in header  # the Ascend image has the npu extra
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "npu" in extras["optional-dependencies"]


def test_installs_with_the_makefile() -> None:
    [install] = [r for r in instructions("RUN") if "make install" in r]
    make_args = dict(re.findall(r"(\w+)=(\"\$\{\w+\}\"|\S+)", install.split("make install", 1)[1]))
    assert make_args["TORCH_SPEC"] == '"${TORCH_SPEC}"'
    assert make_args["MOONCAKE_SPEC"] == '"${MOONCAKE_SPEC}"'
    assert make_args["TEST_TOOLS"] == "no"
    # Those are the Makefile's own variables, and TEST_TOOLS=no leaves out only test tools:
    # a dry run of the install prints the same steps but for the ones guarded by TEST_TOOLS.
    makefile = (ROOT / "Makefile").read_text()
    for var in ("TORCH_SPEC", "MOONCAKE_SPEC", "TEST_TOOLS", "VENV"):
        assert re.search(rf"^{var} \?=", makefile, re.M), var

    def dry_run(test_tools: str) -> list[str]:
        proc = subprocess.run(
            ["make", "-n", "-B", "-f", str(ROOT / "Makefile"), "install", "VENV=/nonexistent",
             f"TEST_TOOLS={test_tools}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return proc.stdout.splitlines()

    with_tools, without = dry_run("yes"), dry_run("no")
    assert len(with_tools) == len(without)
    changed = [a for a, b in zip(with_tools, without, strict=True) if a != b]
    assert changed and all("promtool" in a or "kubectl" in a for a in changed), changed


def test_copies_every_package_and_bakes_the_demo_model() -> None:
    copied = {v.split()[0].rstrip("/") for v in instructions("COPY")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    for source in copied:
        for name in source.split():
            assert (ROOT / name).exists(), name
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    for source in copied:  # the build context keeps what the COPY lines take
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    # The checkpoint written at build time is where the CPU manifests look for it.
    env = " ".join(instructions("ENV"))
    cache = re.search(r"PDSERVE_CACHE=(\S+)", env)
    assert cache is not None
    baked = f"{cache.group(1)}/models/{DEFAULT_MODEL_FAMILY}"
    assert any("default_model_dir()" in r for r in instructions("RUN"))
    spec = (ROOT / "deploy" / "k8s" / "base" / "cluster-spec.yaml").read_text()
    router = (ROOT / "deploy" / "k8s" / "base" / "router.yaml").read_text()
    assert f"path: {baked}" in spec and f"--model-path={baked}" in router
