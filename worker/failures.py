"""Map what went wrong in a job to an error code and a message the user can act on."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from jobstore.states import ErrorCode
from simmim.config import format_validation_error
from simmim.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError

OOM_ADVICE = ("out of memory; lower training.batch_size and raise training.accumulation_steps to keep "
              "the same total batch, use a smaller image_size or model, or precision=bf16")
_MAX_MESSAGE = 2000


def classify(exc: BaseException) -> tuple[ErrorCode, str]:
    """The error code and a short human message (never a traceback) for ``exc``."""
    code, message = _classify(exc)
    return code, message[:_MAX_MESSAGE]


def _classify(exc: BaseException) -> tuple[ErrorCode, str]:
    if isinstance(exc, ValidationError):
        return ErrorCode.INVALID_SPEC, "invalid job spec: " + "; ".join(format_validation_error(exc))
    if isinstance(exc, ConfigError):
        return ErrorCode.INVALID_SPEC, "invalid job spec: " + "; ".join(exc.problems)
    if isinstance(exc, DataError):
        return ErrorCode.DATA_ERROR, str(exc)
    if is_oom(exc):
        if isinstance(exc, MemoryError) and str(exc).startswith("out of memory"):
            return ErrorCode.OOM, str(exc)  # our own message: what was tried, what to change
        return ErrorCode.OOM, OOM_ADVICE
    if _is_soft_time_limit(exc):
        return ErrorCode.TIMEOUT, "the task ran past its time limit; it was checkpointed where possible"
    if isinstance(exc, NonFiniteLossError | CheckpointError):
        return ErrorCode.INTERNAL, str(exc)
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return ErrorCode.INTERNAL, f"internal error ({type(exc).__name__}{': ' + detail if detail else ''})"


def is_oom(exc: BaseException) -> bool:
    """A host or GPU out-of-memory error (``torch.OutOfMemoryError`` is the CUDA one)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only loaded when training ran, never imported here
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _is_soft_time_limit(exc: BaseException) -> bool:
    from celery.exceptions import SoftTimeLimitExceeded

    return isinstance(exc, SoftTimeLimitExceeded)
