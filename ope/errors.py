"""ope's error vocabulary: each type means one thing, so callers can catch precisely.

Everything ope raises on purpose derives from :class:`OpeError`. The same error types are
raised in-process and out-of-process: a worker reports its failure as (type name, message,
traceback text) and the host re-raises it as the matching type from this module.
"""

__all__ = [
    "OpeError", "PackageError", "RequirementError", "SpecError", "ModelError",
    "ProtocolError", "ArenaFull", "WorkerError", "WorkerCrashed", "WorkerTimeout",
    "MemoryLimitExceeded", "ModelBroken", "ModelClosed", "EnvError",
]


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
