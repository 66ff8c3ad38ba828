"""Host-wide services (the supervisor thread, the output reader): one instance per process,
made on first use. A forked child has none of its parent's threads, so it forgets the
parent's instance, and the lock another thread may have held at the fork, and makes its own
when it needs one."""

import os
import threading

__all__ = ["PerProcess"]


class PerProcess:
    """Base of a class with one instance per process: :meth:`get` returns it."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._forget()
        os.register_at_fork(after_in_child=cls._forget)

    @classmethod
    def _forget(cls):
        cls._instance = None
        cls._instance_lock = threading.Lock()

    @classmethod
    def get(cls):
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance
