"""Helpers for the shared-memory unit tests: memfd mappings and forked children.

A test that feeds corrupt shared memory to native code runs that code in a forked child, so
that a crash or a hang is an outcome the test reports instead of the end of the test run.
"""

import faulthandler
import os
import pickle
import select
import signal

import ope_native

__all__ = ["memfd_mapping", "run_in_child", "reap"]


def memfd_mapping(size, file_size=None):
    """An ope_native.Mapping of ``size`` bytes over a memfd (nothing in /dev/shm). With a
    smaller ``file_size``, touching the mapping past the end of the file raises SIGBUS, which
    makes an out-of-bounds access visible."""
    fd = os.memfd_create("ope-test")
    try:
        os.ftruncate(fd, size if file_size is None else file_size)
        return ope_native.Mapping(fd, size)
    finally:
        os.close(fd)


def reap(pid, timeout_s):
    """Wait for child ``pid`` for up to ``timeout_s``, then SIGKILL it; returns its wait status
    and whether it ended on its own."""
    pidfd = os.pidfd_open(pid)
    try:
        ended, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if not ended:
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1], bool(ended)


def run_in_child(fn, timeout_s=10.0):
    """Run ``fn()`` in a forked child. Returns ("returned", value), ("raised", type name,
    text), ("signal", signum) or ("hung",); ``value`` must pickle."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the test run
        try:
            faulthandler.disable()  # a crash is the expected outcome here, not news for stderr
            os.close(r)
            try:
                outcome = ("returned", fn())
            except BaseException as exc:  # noqa: BLE001 (the outcome is the point)
                outcome = ("raised", type(exc).__name__, str(exc))
            os.write(w, pickle.dumps(outcome))
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout_s)
        data = b""
        if ready:
            while chunk := os.read(r, 65536):
                data += chunk
    finally:
        os.close(r)
    status, ended = reap(pid, 0 if not ready else timeout_s)
    if not ended or not ready:
        return ("hung",)
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status))
    return pickle.loads(data)
