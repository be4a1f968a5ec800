"""Weight loading: safetensors checkpoints (single file or sharded) and seeded dummy weights.

A model declares, through `weight_map()`, every Hugging Face tensor it expects and the slice of
which parameter it fills (`WeightTarget`). Loading checks the set both ways and fails with the
names of missing and unexpected tensors, and with both shapes on a shape mismatch.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class WeightTarget:
    """Destination of one checkpoint tensor: `param[expert][offset:offset + size]` (dim 0).

    `expert` selects a slice of a stacked expert parameter; `size` None means the whole
    (remaining) first dimension. `source_size` not None takes only a part of the checkpoint
    tensor, `source_size` entries from `source_offset` along its dimension `source_dim` (a
    shared-experts MLP split into several stacked experts: rows of gate/up, columns of down).
    """

    param: str
    expert: int | None = None
    offset: int = 0
    size: int | None = None
    source_dim: int = 0
    source_offset: int = 0
    source_size: int | None = None

    def __post_init__(self) -> None:
        if self.source_size is not None and (self.source_size < 1 or self.source_offset < 0):
            raise ValueError(
                f"{self.param}: a source slice needs size >= 1 and offset >= 0, got "
                f"{self.source_size} at {self.source_offset}"
            )

    def source(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of checkpoint `tensor` that goes to this target."""
        if self.source_size is None:
            return tensor
        end = self.source_offset + self.source_size
        if tensor.dim() <= self.source_dim or tensor.shape[self.source_dim] < end:
            raise ValueError(
                f"{self.param}: cannot take [{self.source_offset}:{end}] along dim "
                f"{self.source_dim} of a checkpoint tensor of shape {tuple(tensor.shape)}"
            )
        return tensor.narrow(self.source_dim, self.source_offset, self.source_size)


class HasParameters(Protocol):
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...


class LoadableModel(HasParameters, Protocol):
    def weight_map(self) -> WeightTargets:
        """Every checkpoint tensor name the model expects, and where it goes."""
        ...

    def ignored_weight(self, name: str) -> bool:
        """Whether a checkpoint tensor outside `weight_map` may be skipped silently."""
        ...


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({root / shard for shard in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {root}")
    return files


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, with a progress bar."""
    files = checkpoint_files(model_dir)
    show = len(files) > 1 and sys.stderr.isatty()
    for path in tqdm(files, desc="loading safetensors shards", disable=not show):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def _destination(params: dict[str, nn.Parameter], name: str, target: WeightTarget) -> torch.Tensor:
    if target.param not in params:
        raise KeyError(f"{name} maps to {target.param}, which the model does not have")
    dest: torch.Tensor = params[target.param].data
    if target.expert is not None:
        dest = dest[target.expert]
    if target.size is not None or target.offset:
        size = dest.shape[0] - target.offset if target.size is None else target.size
        dest = dest.narrow(0, target.offset, size)
    return dest


WeightTargets = Mapping[str, "WeightTarget | tuple[WeightTarget, ...]"]


def load_weights(
    model: LoadableModel,
    weights: Iterator[tuple[str, torch.Tensor]],
    targets: WeightTargets | None = None,
) -> None:
    """Copy checkpoint tensors into the model; error on missing, unexpected or misshapen ones.

    `targets` (default: the model's `weight_map()`) may send one tensor to several places
    (replicated experts) or to none on this rank (an empty tuple: expected, not needed here).
    """
    targets = model.weight_map() if targets is None else targets
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        target = targets.get(name)
        if target is None:
            if not model.ignored_weight(name):
                unexpected.append(name)
            continue
        for one in target if isinstance(target, tuple) else (target,):
            dest = _destination(params, name, one)
            part = one.source(tensor)
            if tuple(dest.shape) != tuple(part.shape):
                sliced = "" if part is tensor else f" (its slice {tuple(part.shape)})"
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}{sliced}, but the "
                    f"model expects {tuple(dest.shape)} (config.json and weights disagree)"
                )
            dest.copy_(part)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing tensors {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''} ({len(missing)} in all); "
            f"unexpected tensors {sorted(unexpected)[:20]} ({len(unexpected)} in all)"
        )


def load_dummy_weights(model: HasParameters, seed: int) -> None:
    """Seeded random weights, identical in every process that uses the same seed and device.

    Norm weights are ones and biases zeros, so activations keep a sane scale; matrices are
    normal with std 0.02. Each parameter's generator is seeded from `seed` and its name.
    """
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                gen = torch.Generator(device=param.device)
                gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.normal_(0.0, 0.02, generator=gen)
