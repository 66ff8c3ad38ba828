"""The worker process: serves one model to its host over a shared-memory arena.

``python -m workers.worker --arena PREFIX --first-id N --host-pid PID --host-pipe FD ...``
attaches to the arena the host created, says HELLO, loads the package it is told to, then
answers INFER messages in order until SHUTDOWN (protocol: ope/protocol.py). Inputs are
read-only numpy views on the host's blocks; each output is written into a block of the
worker's own ring once. While the model is ready, calls are answered in C around the model
(ope_native.serve_calls: decode, run, encode, send), which leaves everything else to this
loop: other messages, a model's error, outputs that need the spec's check. :class:`Worker`
holds the loop so tests can drive it without a process; :func:`main` only wires it up.
"""

import argparse
import faulthandler
import os
import platform
import sys
import traceback

import numpy as np

import ope_native
from ope import protocol
from ope.arena import Arena
from ope.errors import ModelError, OpeError
from ope.package import read_package
from ope.requirements import ensure_requirements
from ope.spec import validate_inputs, validate_outputs
from workers.runners import load_runner

__all__ = ["Worker", "main", "runtime_info"]

_TRACEBACK_LIMIT = 16_000  # characters; a traceback must fit a control message
_serve_calls = ope_native.serve_calls


def runtime_info():
    """What the host may want to know about this worker's runtime."""
    info = {"pid": os.getpid(), "python": platform.python_version(), "numpy": np.__version__,
            "executable": sys.executable}
    info["cpus"] = sorted(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


class Worker:
    """The request loop of one worker, over an attached :class:`ope.arena.Arena`."""

    def __init__(self, arena):
        self.arena = arena
        self.channel = arena.channel
        self.conversation = protocol.Conversation("worker")
        self.package = None
        self.runner = None
        self._output_names = frozenset()
        self._handlers = {protocol.LOAD: self._load, protocol.INFER: self._infer,
                          protocol.SHUTDOWN: self._shutdown}
        self.running = True

    def serve(self):
        """Say HELLO, then answer messages until SHUTDOWN or the channel closes."""
        self._send([protocol.HELLO, protocol.VERSION, runtime_info()])
        while self.running:
            data, call = self._next_message()
            if data is None:
                break
            if call is None:
                self.handle(protocol.unpack(data, self.arena))
            else:
                self._finish_call(*call)

    def _next_message(self):
        """(data, call): the next message for Python to handle, or a call for it to finish;
        data None once the channel closed. While the model is ready, ope_native's loop answers
        calls itself (serve_calls: decode, run, encode, send with no Python of ours between)
        and returns only what it leaves to Python."""
        if self.conversation.state != "ready":
            return self.channel.receive(), None
        arena = self.arena
        self.channel.spin_s, data, call = _serve_calls(
            self.channel.mapping, self.channel.in_q, self.channel.out_q, self.channel.spin_s,
            arena.decoding, arena.encoding, self.runner.run, self._output_names)
        return data, call

    def handle(self, message):
        """Check and answer one decoded message."""
        self.conversation.received(message)
        reply = self._handlers[message[0]](message)
        if reply is not None:
            self._send(reply)

    def _send(self, message, data=None):
        """Send ``message``; ``data`` is its encoding when the caller has it (a tensor frame)."""
        self.conversation.sent(message)
        if not self.channel.send(protocol.pack(message) if data is None else data):
            self.running = False

    def _load(self, message):
        _, path, options = message
        try:
            if options.get("cpus"):
                os.sched_setaffinity(0, options["cpus"])
            self.package = read_package(path)
            ensure_requirements(self.package)
            self.runner = load_runner(self.package)
            if options.get("threads") and "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(options["threads"])
        except Exception as exc:
            return _error_message(None, exc)
        self._output_names = frozenset(spec.name for spec in self.package.outputs)
        return [protocol.READY, runtime_info()]

    def _infer(self, message):
        call_id, arrays = message[1], message[2]
        try:
            outputs = self.runner.run(arrays)
        except Exception as exc:
            return _error_message(call_id, exc)
        return self._answer(call_id, arrays, outputs)

    def _finish_call(self, call_id, arrays, outputs, error):
        """Answer a call that serve_calls decoded and ran, and left to Python: the model
        raised ``error``, or its ``outputs`` need the spec's check (or its error)."""
        self.conversation.received([protocol.INFER, call_id, arrays])
        reply = _error_message(call_id, error) if error is not None \
            else self._answer(call_id, arrays, outputs)
        if reply is not None:
            self._send(reply)

    def _answer(self, call_id, arrays, outputs):
        """Send the RESULT of ``outputs``; the ERROR to send instead if they cannot be."""
        try:
            frame = self._encode_outputs(call_id, arrays, outputs)
        except Exception as exc:
            return _error_message(call_id, exc)
        self._send([protocol.RESULT, call_id], frame)
        return None

    def _encode_outputs(self, call_id, inputs, outputs):
        """The RESULT frame of ``outputs``, each written into the worker's ring once."""
        encoded = None
        if type(outputs) is dict and outputs.keys() == self._output_names:
            encoded = self.arena.encode(protocol.RESULT, call_id, outputs)
        if encoded is None:
            # The host validates outputs on every call; here only what cannot be sent as is
            # gets the in-process check, which raises the same SpecError in-process would.
            bindings = validate_inputs(self.package.inputs, inputs)[1]
            outputs = validate_outputs(self.package.outputs, outputs, bindings)
            encoded = self.arena.encode(protocol.RESULT, call_id, outputs)
        return encoded[0]

    def _shutdown(self, message):
        self.running = False


def _error_message(call_id, exc):
    """An ERROR message for ``exc``; exceptions that are not ope's own become ModelError."""
    if not isinstance(exc, OpeError):
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        exc = ModelError(f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
                         traceback_text=text)
    return [protocol.ERROR, call_id, type(exc).__name__, OpeError.__str__(exc),
            protocol.error_fields(exc, _TRACEBACK_LIMIT)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__)
    parser.add_argument("--arena", required=True, help="name prefix of the host's arena")
    parser.add_argument("--first-id", type=int, required=True, help="first id for new segments")
    parser.add_argument("--host-pid", type=int, required=True, help="exit when this pid is gone")
    parser.add_argument("--host-pipe", type=int, required=True,
                        help="read end of the host's pipe: exit at its end of file")
    parser.add_argument("--max-bytes", type=int, required=True, help="arena limit of this side")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crashing model leaves its stack in the output the host keeps
    # Processes the model starts need not hold it; the watchdog's copy is all it takes.
    os.set_inheritable(args.host_pipe, False)
    ope_native.exit_with_parent(args.host_pid, args.arena, args.host_pipe)
    arena = Arena.attach(args.arena, args.first_id, args.max_bytes)
    try:
        Worker(arena).serve()
    finally:
        arena.close()
        sys.stdout.flush()
        sys.stderr.flush()
    # Skip interpreter teardown: frameworks (torch) take most of a second to unwind, and the
    # host is waiting for this process to exit.
    os._exit(0)


if __name__ == "__main__":
    main()
