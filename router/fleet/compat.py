"""Which workers can serve together, and the model they serve.

Every member passed ``GetInfo`` (``read_info``: the role it was given) and ``Compatibility``:
one model and vocabulary (and weights, where stated); one KV layout fingerprint across
prefill and decode workers; a context at least the router's. A refusal names the worker and
both values.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos.contract import ROLE_COLOCATED, ROLE_DECODE, ROLE_PREFILL
from router.fleet.worker import WorkerClient, WorkerInfo


class WorkerUnreachable(RuntimeError):
    """The worker did not answer ``GetInfo`` in time."""


class WorkerRefused(RuntimeError):
    """The worker answered but cannot join: wrong role, other model, other KV layout..."""


@dataclass(frozen=True)
class ModelInfo:
    """What the router knows of the served model, from the workers' GetInfo."""

    name: str
    context_length: int
    vocab_size: int  # the model's (possibly padded) vocabulary, as workers validate ids

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")


async def read_info(worker: WorkerClient, timeout_s: float) -> WorkerInfo:
    """``worker``'s GetInfo; WorkerUnreachable when it does not answer in ``timeout_s``,
    WorkerRefused when its role is not the one it was given."""
    try:
        info = await worker.get_info(timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise WorkerUnreachable(
            f"worker {worker.endpoint} did not answer GetInfo within {timeout_s:g}s: "
            f"{exc.code().name} {exc.details()}"
        ) from exc
    if info.role != worker.role:
        flag = "--worker" if worker.role == ROLE_COLOCATED else f"--{worker.role}"
        raise WorkerRefused(
            f"worker {worker.endpoint} has role {info.role!r} but was given as {flag} "
            f"(role {worker.role!r})"
        )
    return info


class Compatibility:
    """The references newcomers are checked against: the first worker checked sets the model,
    the first prefill or decode worker the KV layout; ``model`` once ``set_model`` fixed it."""

    def __init__(self) -> None:
        self.model: ModelInfo | None = None  # fixed by set_model
        self._reference: WorkerInfo | None = None  # the first member: its model and vocab
        self._layout: WorkerInfo | None = None  # the first prefill/decode member: its layout

    @property
    def known(self) -> bool:
        return self._reference is not None

    def set_model(self, served_model_name: str | None, context_length: int) -> ModelInfo:
        """Fix the model the router serves: the first worker's (or ``served_model_name``),
        with ``context_length`` (the members' least)."""
        if self._reference is None:
            raise RuntimeError("no worker is known yet")
        self.model = ModelInfo(
            name=served_model_name or self._reference.model,
            context_length=context_length,
            vocab_size=self._reference.vocab_size,
        )
        return self.model

    def check(self, info: WorkerInfo) -> None:
        """WorkerRefused naming both values when ``info`` cannot serve beside the members."""
        ref = self._reference
        if ref is not None and (info.model != ref.model or info.vocab_size != ref.vocab_size):
            raise WorkerRefused(
                f"workers serve different models: {ref.endpoint} has {ref.model!r} "
                f"(vocab {ref.vocab_size}) but {info.endpoint} has {info.model!r} "
                f"(vocab {info.vocab_size})"
            )
        if ref is not None and ref.weights and info.weights and info.weights != ref.weights:
            raise WorkerRefused(
                f"workers serve different weights: {ref.endpoint} has {ref.weights!r} but "
                f"{info.endpoint} has {info.weights!r}"
            )
        layout = self._layout
        if (
            layout is not None
            and info.role in (ROLE_PREFILL, ROLE_DECODE)
            and info.fingerprint != layout.fingerprint
        ):
            raise WorkerRefused(
                f"{info.role} worker {info.endpoint} and {layout.role} worker "
                f"{layout.endpoint} cannot pair: KV layout fingerprint "
                f"{info.fingerprint!r} != {layout.fingerprint!r}"
            )
        if self.model is not None and info.context_length < self.model.context_length:
            raise WorkerRefused(
                f"worker {info.endpoint} has context length {info.context_length} but the "
                f"router serves {self.model.context_length}"
            )
        # The first worker checked sets the model; the first prefill or decode the layout.
        if self._reference is None:
            self._reference = info
        if self._layout is None and info.role in (ROLE_PREFILL, ROLE_DECODE):
            self._layout = info
