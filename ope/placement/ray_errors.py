"""What a failure on a Ray cluster means in ope's vocabulary: one function, one table.

A placed model keeps the meaning of its errors: the model's own (ModelError, SpecError,
ArenaFull, WorkerTimeout of the node's worker, ...) arrive unchanged, same type and message;
what Ray reports about the actor, its node or the object store becomes the ope error that
means the same for a local worker. The caller decides what follows (a lost actor is replaced
on the next call, ope/placement/ray_model.py), told by the second value returned.
"""

from ope.errors import (ArenaFull, EnvError, MemoryLimitExceeded, OpeError, WorkerCrashed,
                        WorkerTimeout, bounded_text, exception_text, MESSAGE_LIMIT)

__all__ = ["ope_error"]

# Ray's words when an actor went down with its node (ActorDiedErrorContext's message).
_NODE_DEATH_WORDS = ("node has died", "node died", "node is dead", "raylet died")


def ope_error(exc, *, model, node):
    """``(error, lost)``: the ope error for ``exc``, raised by Ray while ``model`` (its name)
    was served on ``node`` (its id, or None before the actor was placed), and whether the
    actor is gone and must be replaced. ``exc`` itself when it is not Ray's."""
    import ray.exceptions as rex  # Ray is imported only for placed models

    where = f"model {model!r} on Ray node {node or 'unknown'}"
    text = bounded_text(exception_text(exc), MESSAGE_LIMIT)
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OpeError):
            return cause, False  # the model's (or the node's ope's) own error, unchanged
        return WorkerCrashed(f"{where}: the actor failed outside ope: {text}"), True
    if isinstance(exc, OpeError) or not isinstance(exc, rex.RayError):
        return exc, False
    if isinstance(exc, (rex.ActorUnschedulableError, rex.TaskUnschedulableError,
                        rex.RuntimeEnvSetupError)):
        return EnvError(f"{where}: Ray cannot place it: {text}"), False
    if isinstance(exc, rex.OutOfMemoryError):
        return MemoryLimitExceeded(f"{where}: Ray's memory monitor killed the call: {text}"), False
    if isinstance(exc, (rex.ObjectStoreFullError, rex.OutOfDiskError)):
        return ArenaFull(f"{where}: the object store is full: {text}"), False
    if isinstance(exc, rex.GetTimeoutError):
        return WorkerTimeout(f"{where}: no reply before the deadline; the call was "
                             f"cancelled"), False
    if isinstance(exc, (rex.NodeDiedError, rex.LocalRayletDiedError)) or (
            isinstance(exc, rex.RayActorError) and _says_node_died(text)):
        return WorkerCrashed(f"{where}: node lost: {text}"), True
    if isinstance(exc, rex.RayActorError):
        return WorkerCrashed(f"{where}: actor died: {text}"), True
    return WorkerCrashed(f"{where}: Ray failed the call: {text}"), False


def _says_node_died(text):
    lowered = text.lower()
    return any(words in lowered for words in _NODE_DEATH_WORDS)
