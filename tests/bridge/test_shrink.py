"""The arena gives grown segments back (ope/bridge/arena.py, shrinking): only a segment whose
ring holds no block and saw no allocation for the quiet time, never the host's first, and the
peer drops its mapping once the owner marked the segment retired. numpy's memory hook
(ope_native.memhook_new) cuts large arrays from the same rings.
"""

import os

import numpy as np
import pytest

import ope_native
from ope.bridge import protocol
from ope.bridge.arena import Arena

from conftest import attach_worker

KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture
def pair():
    host = Arena.create(queue_bytes=4 * KIB, ring_bytes=64 * KIB, max_bytes=64 * MIB)
    worker = attach_worker(host, max_bytes=64 * MIB)
    yield host, worker
    worker.close()
    host.close()


def output(host, worker, nbytes, value):
    """What the host decodes of a worker's output of ``nbytes`` filled with ``value``."""
    frame = worker.encode(protocol.RESULT, 1, {"y": np.full(nbytes, value, np.uint8)})[0]
    return host.decode(frame)[2]["y"]


def sweep(arena, keep_bytes=0):
    """Bytes given back by two sweeps with no allocation between them (quiet time 0): a
    segment first seen by the first is retired by the second."""
    return arena.retire_empty(keep_bytes, 0.0) + arena.retire_empty(keep_bytes, 0.0)


def test_an_empty_quiet_worker_segment_is_retired_and_the_host_forgets_it(pair):
    host, worker = pair
    first = output(host, worker, 1 * MIB, 1)
    burst = output(host, worker, 8 * MIB, 2)
    assert host.peer_bytes > 9 * MIB and worker.own_bytes > 9 * MIB
    del burst
    assert sweep(worker) > 8 * MIB  # the burst's segment, not the one `first` lies in
    assert (first == 1).all()
    host.forget_retired()
    assert 1 * MIB < host.peer_bytes < 4 * MIB
    assert (first == 1).all()
    del first
    sweep(worker)
    host.forget_retired()
    assert worker.own_bytes == 0 and host.peer_bytes == 0
    assert (output(host, worker, 2 * MIB, 3) == 3).all()  # the worker grows again


def test_a_segment_is_retired_only_after_its_quiet_time(pair):
    host, worker = pair
    output(host, worker, 1 * MIB, 1)
    assert worker.retire_empty(0, 60.0) == 0
    assert worker.retire_empty(0, 60.0) == 0  # empty, but not quiet long enough
    assert sweep(worker) > 0


def test_an_allocation_between_sweeps_keeps_the_segment(pair):
    host, worker = pair
    worker.retire_empty(0, 0.0)
    output(host, worker, 1 * MIB, 1)
    assert worker.retire_empty(0, 0.0) == 0  # it allocated since the last look
    assert worker.own_bytes > 0


def test_keep_bytes_and_the_hosts_first_segment_stay(pair):
    host, worker = pair
    output(host, worker, 1 * MIB, 1)
    assert sweep(worker, keep_bytes=4 * MIB) == 0
    first = host.own_bytes
    frame, _, scratch, sealed = host.encode(protocol.INFER, 1, {"x": np.ones(4 * MIB, np.uint8)})
    ope_native.release_inputs(scratch, sealed)  # the call was answered
    assert host.own_bytes > first
    assert sweep(host) > 0 and host.own_bytes == first
    assert sweep(host) == 0


def test_the_worker_forgets_host_segments_and_new_workers_never_get_them(pair):
    host, worker = pair
    frame, _, scratch, sealed = host.encode(protocol.INFER, 1, {"x": np.ones(4 * MIB, np.uint8)})
    x = worker.decode(frame)[2]["x"]
    assert (x == 1).all() and len(worker.descriptors()) == 2
    del x
    ope_native.release_inputs(scratch, sealed)
    assert sweep(host) > 0
    worker.forget_retired()
    assert len(worker.descriptors()) == 1
    spec, fds = host.connect()
    assert spec.endswith(";segments=1:" + str(fds[2]))
    for fd in fds:
        os.close(fd)


def test_memhook_needs_numpy_1_22_and_starts_with_nothing_alive(pair):
    _, worker = pair
    hook = worker.numpy_hook()
    assert hook is not None  # numpy >= 1.22 here
    assert ope_native.memhook_counts(hook) == (0, 0, 0)
    with pytest.raises(TypeError):
        ope_native.memhook_counts(None)
