"""ope's error vocabulary: each type means one thing, so callers can catch precisely.

Everything ope raises on purpose derives from :class:`OpeError`. The same error types are
raised in-process and out-of-process: a worker reports its failure as (type name, message,
traceback text) and the host re-raises it as the matching type from this module.

An error's texts come from code ope does not control (a model's exception), so one rule,
:func:`bounded_text`, makes every text ope reports safe in both modes: printable and encodable
(lone surrogates escaped), and bounded in length (a worker's ERROR must fit its control
queue, and a log line should not carry megabytes). :func:`model_error` applies it to an
exception raised by model code, whose ``__str__`` may even raise. (These helpers are for
ope's own modules; ``__all__``, which ``ope`` re-exports, lists the error types only.)
"""

import traceback

__all__ = [
    "OpeError", "PackageError", "RequirementError", "SpecError", "ModelError", "InputWriteError",
    "ProtocolError", "ArenaFull", "WorkerError", "WorkerCrashed", "WorkerTimeout",
    "MemoryLimitExceeded", "ModelBroken", "ModelClosed", "EnvError",
]

MESSAGE_LIMIT = 2_000  # characters of an error's message
TRACEBACK_LIMIT = 16_000  # characters of a model's traceback text
# Room kept for the note that replaces the middle of a cut text (it takes under 60 characters),
# so a cut text stays within its limit and cutting it again changes nothing.
_NOTE_ROOM = 64


class OpeError(Exception):
    """Base of every error ope raises on purpose."""


class PackageError(OpeError):
    """A model package is missing, incomplete, corrupt (hash mismatch) or badly configured,
    or the model failed its self-check."""


class RequirementError(PackageError):
    """The running environment does not satisfy a package's ``requires``."""


class SpecError(OpeError, ValueError):
    """A tensor does not match its spec: names the tensor and what was expected vs got."""


class ModelError(OpeError):
    """The model's own code raised. Carries the original type name and traceback text."""

    def __init__(self, message, *, error_type="", traceback_text=""):
        super().__init__(message)
        self.error_type = error_type
        self.traceback_text = traceback_text

    def __str__(self):
        text = super().__str__()
        if self.traceback_text:
            text += "\n\nModel traceback:\n" + self.traceback_text.rstrip()
        return text


class InputWriteError(ModelError):
    """The model wrote into one of its inputs in place (``x.mul_(2)``, ``relu_``). Inputs are
    read-only: the caller's arrays and sealed buffers never change; the model stays usable."""


class ProtocolError(OpeError):
    """The other side of the bridge sent something malformed or out of order
    (garbage in shared memory, a descriptor outside the arena, a wrong transition)."""


class ArenaFull(OpeError):
    """A tensor does not fit in the worker's shared-memory arena, even after growing it to its
    configured maximum. The model stays usable; smaller calls go on working."""


class WorkerError(OpeError):
    """Base of faults of a worker process (as opposed to faults of the model's code)."""


class WorkerCrashed(WorkerError):
    """The worker process died (signal, exit, OOM kill) while starting or serving a call."""

    def __init__(self, message, *, exitcode=None, stderr_tail=""):
        super().__init__(message)
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail

    def __str__(self):
        text = super().__str__()
        if self.stderr_tail:
            text += "\n\nLast worker stderr:\n" + self.stderr_tail.rstrip()
        return text


class WorkerTimeout(WorkerError):
    """A call ran past its deadline; the worker was stopped and will be replaced."""


class MemoryLimitExceeded(WorkerError):
    """The worker's memory (RSS of it and its children) crossed ``memory_limit_mb``."""


class ModelBroken(WorkerError):
    """The worker failed too often within the restart window; the model refuses calls."""


class ModelClosed(OpeError):
    """The model was closed by its owner; no further calls are accepted."""


class EnvError(OpeError):
    """A worker environment is missing, incompatible, or could not be created."""


def bounded_text(text, limit):
    """``text`` made safe to report: lone surrogates (which UTF-8 cannot carry, so a message
    holding one could not be sent) escaped as ``\\udc80``, and a text longer than ``limit``
    characters cut to at most ``limit``. The middle goes, replaced by a note of how many
    characters went: the start says what happened, the end of a traceback where it happened."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    keep = max(limit - _NOTE_ROOM, 0)
    head = keep - keep // 2
    return (f"{text[:head]}\n... [truncated {len(text) - keep:,} characters] ...\n"
            f"{text[len(text) - keep // 2:]}")


def exception_text(exc):
    """``str(exc)``, or a placeholder naming the exception's type when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as failure:
        return f"<{type(exc).__name__} object: its __str__ raised {type(failure).__name__}>"


def model_error(exc, headline, frames):
    """The ModelError for ``exc``, raised by model code: message ``headline: <exc's text>``,
    traceback text from ``frames`` (a traceback object or None), both by :func:`bounded_text`."""
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, frames))
    except Exception as failure:  # format_exception reads attributes the exception may break
        trace = f"<the traceback could not be formatted: {type(failure).__name__}>"
    return ModelError(bounded_text(f"{headline}: {exception_text(exc)}", MESSAGE_LIMIT),
                      error_type=bounded_text(type(exc).__name__, MESSAGE_LIMIT),
                      traceback_text=bounded_text(trace, TRACEBACK_LIMIT))
