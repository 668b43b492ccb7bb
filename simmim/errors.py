"""Errors a user can act on. Each message says what went wrong and what to do."""

from __future__ import annotations


class SimMIMError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(SimMIMError, ValueError):
    """A configuration or spec is invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:  # picklable across training processes
        return type(self), (self.problems,)


class DataError(SimMIMError):
    """The dataset cannot be used (missing, empty, unreadable, unsupported format)."""


class ImageDecodeError(DataError):
    """One image could not be decoded; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.name, self.reason)


class NonFiniteLossError(SimMIMError):
    """Training produced a NaN/inf loss; the run stops instead of corrupting the weights."""

    def __init__(self, step: int, loss: float) -> None:
        self.step = step
        self.loss = loss
        super().__init__(
            f"loss became {loss} at step {step}; training stopped. Lower optim.base_lr, "
            "keep optim.grad_clip set, or use precision=fp32, then resume from the last checkpoint."
        )

    def __reduce__(self) -> tuple[type, tuple[int, float]]:
        return type(self), (self.step, self.loss)


class CheckpointError(SimMIMError):
    """A checkpoint is missing, corrupt, or does not match the model."""
