"""The worker process: serves one model to its host over a shared-memory arena.

``python -m workers.worker --arena SPEC --first-id N --host-pid PID --host-pipe FD ...``
attaches to the arena the host handed it (its segments are inherited descriptors,
ope/bridge/arena.py), says HELLO, loads the package it is told to, then answers INFER messages in
order until SHUTDOWN (protocol: ope/bridge/protocol.py). Inputs are read-only numpy views on the
host's blocks. While the model runs, numpy allocates large arrays in the worker's own ring
(ope_native's memory hook), so an output the model made and let go of is named where it
lies; any other output is written into a block of the worker's own ring once. While the
model is ready, calls are answered in C around the model (ope_native.serve_calls: decode, run,
encode, send), which leaves everything else to this loop: other messages, a model's error,
outputs that need the spec's check. :class:`Worker` holds the loop so tests can drive it
without a process; :func:`main` only wires it up.
"""

import argparse
import faulthandler
import os
import platform
import sys
import traceback

import numpy as np

import ope_native
from ope.bridge import protocol
from ope.bridge.arena import Arena
from ope.errors import MESSAGE_LIMIT, TRACEBACK_LIMIT, OpeError, bounded_text, model_error
from ope.package import read_package
from ope.requirements import ensure_requirements
from ope.spec import validate_inputs, validate_outputs
from ope.runners import load_runner

__all__ = ["Worker", "main", "runtime_info"]

_serve_calls = ope_native.serve_calls
# While it holds segments it could give back (more than KEEP_BYTES of its own, or more than
# one of the host's mapped), an idle worker looks every SWEEP_S and gives back its segments
# that saw no allocation for QUIET_S: a burst's memory returns, a steady stream of calls never
# pays for growing again, and the worker keeps a small ring for its next call.
SWEEP_S = 0.5
QUIET_S = 1.0
KEEP_BYTES = 4 << 20


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
    """The request loop of one worker, over an attached :class:`ope.bridge.arena.Arena`."""

    def __init__(self, arena):
        self.arena = arena
        self.channel = arena.channel
        self.conversation = protocol.Conversation("worker")
        self.package = None
        self.runner = None
        self._output_names = frozenset()
        # numpy's handler while the model runs: outputs born in the worker's ring (None: copied)
        self._hook = arena.numpy_hook() if os.environ.get("OPE_ARENA_OUTPUTS", "1") != "0" else None
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
                call_id, arrays = call[0], call[1]
                self.conversation.received([protocol.INFER, call_id, arrays])
                reply = self._reply(*call)
                del call  # what the model returned or raised may hold inputs: let it go
                self._answer(arrays, *reply)

    def _next_message(self):
        """(data, call): the next message for Python to handle, or a call for it to finish;
        data None once the channel closed. While the model is ready, ope_native's loop answers
        calls itself (serve_calls: decode, run, encode, send with no Python of ours between)
        and returns only what it leaves to Python."""
        if self.conversation.state != "ready":
            return self.channel.receive(), None
        arena = self.arena
        while True:
            self.channel.spin_s, data, call = _serve_calls(
                self.channel.mapping, self.channel.in_q, self.channel.out_q, self.channel.spin_s,
                arena.decoding, arena.encoding, self.runner.run, self._output_names, self._hook,
                SWEEP_S, KEEP_BYTES)
            if data is not None or call is not None or self.channel.closed:
                return data, call
            self._give_back_segments()

    def _give_back_segments(self):
        """Idle: give back our grown segments that stayed empty, and forget the host's
        segments it gave back (ope/bridge/arena.py, shrinking)."""
        self.arena.retire_empty(KEEP_BYTES, QUIET_S)
        self.arena.forget_retired()

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
            self.package = read_package(path, manifest_digest=options.get("manifest_digest"))
            ensure_requirements(self.package)
            self.runner = load_runner(self.package, private_inputs=True,
                                      threads=options.get("threads"), device=options.get("device"))
            if options.get("threads") and "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(options["threads"])
            if options.get("warm_up") and self.package.has_test_data:
                _warm_up(self.runner, self.package)
        except Exception as exc:
            return _error_message(None, exc)
        self._output_names = frozenset(self.package.output_names)
        return [protocol.READY, {**runtime_info(), **self.runner.describe()}]

    def _infer(self, message):
        call_id, arrays = message[1], message[2]
        try:
            reply = self._reply(call_id, arrays, self.runner.run(arrays), None)
        except Exception as exc:
            reply = self._reply(call_id, arrays, None, exc)
        self._answer(arrays, *reply)

    def _reply(self, call_id, arrays, outputs, error):
        """(message, frame, failed) answering a call the model ran (serve_calls leaves to
        Python the calls whose model raised ``error`` or whose ``outputs`` need the spec's
        check): the RESULT and its frame, or the ERROR to send instead."""
        if error is None:
            try:
                return [protocol.RESULT, call_id], self._encode_outputs(call_id, arrays, outputs), False
            except Exception as exc:
                error = exc
        message = _error_message(call_id, error)
        _drop_frames(error)
        return message, None, True

    def _answer(self, arrays, message, frame, failed):
        """Send a call's reply, once the inputs it leaves behind are safe to give back: an
        input the model still holds keeps a private copy of its pages, and after a failed
        call (the model may have written into an input, then raised) the host's segments are
        mapped afresh, so no later call reads this call's private copies (ope/bridge/arena.py)."""
        if failed:
            self.arena.remap(arrays.values())
        self.arena.keep_kept(arrays)
        self._send(message, frame)

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


# A TorchScript model profiles and optimizes itself in its first calls (~0.1 s, then a few ms);
# a standby takes them on its package's test inputs, so that its first real call does not.
_WARM_UP_RUNS = 3


def _warm_up(runner, package):
    """Run the package's test inputs through a freshly loaded standby's model."""
    for _ in range(_WARM_UP_RUNS):
        runner.run(package.test_inputs())


def _drop_frames(exc):
    """Clear the locals of the finished frames in ``exc``'s tracebacks (its causes and
    contexts too): they hold the call's inputs, which would otherwise look kept by the model."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _error_message(call_id, exc):
    """An ERROR message for ``exc``; exceptions that are not ope's own become ModelError. Its
    texts go by ope.errors' text rule (bounded_text), whatever they hold: an ERROR that cannot
    be encoded or does not fit the queue would end the worker."""
    if not isinstance(exc, OpeError):
        exc = model_error(exc, type(exc).__name__, exc.__traceback__)
    return [protocol.ERROR, call_id, type(exc).__name__,
            bounded_text(OpeError.__str__(exc), MESSAGE_LIMIT),
            protocol.error_fields(exc, TRACEBACK_LIMIT)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__)
    parser.add_argument("--arena", required=True, help="the arena's inherited descriptors")
    parser.add_argument("--first-id", type=int, required=True, help="first id for new segments")
    parser.add_argument("--host-pid", type=int, required=True, help="exit when this pid is gone")
    parser.add_argument("--host-pipe", type=int, required=True,
                        help="read end of the host's pipe: exit at its end of file")
    parser.add_argument("--max-bytes", type=int, required=True, help="arena limit of this side")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crashing model leaves its stack in the output the host keeps
    # Processes the model starts need not hold it; the watchdog's copy is all it takes.
    os.set_inheritable(args.host_pipe, False)
    ope_native.exit_with_parent(args.host_pid, args.host_pipe)
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
