"""Tensor descriptors (ope/bridge/protocol.py's frame entries) decoded against a real arena: a
host (Arena.create) and a worker attached to it, each of which has grown one segment of its
own. Whatever a descriptor says, the side decoding it views its peer's rings and nothing else,
or raises ProtocolError.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ope
from ope.bridge import protocol
from ope.bridge.arena import Arena
from ope.bridge.protocol import INFER, RESULT
from ope.bridge.ring import BLOCK_HEADER, LINE, RING_HEADER, Ring

from conftest import CODES, STRING, attach_worker, describe, itemsize_of

FLOAT32 = protocol.DTYPE_CODES[np.dtype("float32")]
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- tensor descriptors -------------------------------------------------------------------


@pytest.fixture
def arenas():
    """(host, worker) with a grown segment each: host ids 1 and 3, worker id 2."""
    host = Arena.create(queue_bytes=4096, ring_bytes=64 * 1024, max_bytes=8 << 20)
    try:
        worker = attach_worker(host, max_bytes=8 << 20)
        for arena in (host, worker):  # grow by one segment, then leave the rings empty
            seg_id, payload, ring = arena.alloc(128 * 1024)
            ring.release(payload)
        yield host, worker
        worker.close()
    finally:
        host.close()


def ring_of(block):
    """The Ring a Block's payload belongs to: every data segment holds its ring at offset
    4096 (ope/bridge/arena.py)."""
    return Ring(block.mapping, 4096)


def decode_one(arena, desc):
    """The array ``arena`` makes of one descriptor its peer sends in a frame."""
    message = [RESULT, 1, [desc], 0] if arena.host else [INFER, 1, [desc]]
    return arena.decode(protocol.pack(message))[2][desc[0]]


def array_bounds(array):
    start = array.__array_interface__["data"][0]
    return start, start + array.nbytes


@st.composite
def payloads_near_a_ring(draw, ring_offset):
    """A payload offset around a ring's edges: most bad, some valid."""
    line = draw(st.integers(-3, 40) | st.integers(0, 2 ** 12))
    skew = draw(st.sampled_from([0, 0, 0, 1, -1, 8, LINE - 1]))
    return max(0, ring_offset + RING_HEADER + BLOCK_HEADER + line * LINE + skew)


@st.composite
def descriptors_near_a_ring(draw, seg_ids):
    """A descriptor as unpack_frame passes it on (its sizes agree) for one of the peer's
    segments, or for any segment id, at a payload that may or may not be one of the ring's."""
    seg_id = draw(st.sampled_from(seg_ids) | st.integers(0, 2 ** 63 - 1))
    payload = draw(payloads_near_a_ring(4096)
                   | st.integers(0, 2 ** 63 - 1))
    code = draw(st.sampled_from(CODES))
    itemsize = itemsize_of(code, draw(st.integers(0, 3)))
    count = draw(st.sampled_from([0, 1, 2, 1024]) | st.integers(0, 300_000 // max(itemsize, 1)))
    shape = draw(st.sampled_from([(count,), (1, count), (count, 1)]))
    return ("t", code, itemsize, shape, seg_id, payload, count * itemsize)


@pytest.mark.parametrize("side", ["host", "worker"])
@FUZZ
@given(data=st.data())
def test_bad_descriptors_raise_protocol_error_and_never_view_outside_a_ring(arenas, side, data):
    host, worker = arenas
    arena, peer_ids = (host, [2]) if side == "host" else (worker, [1, 3])
    desc = data.draw(descriptors_near_a_ring(peer_ids))
    try:
        array = decode_one(arena, desc)
    except ope.ProtocolError:
        return
    assert isinstance(array, np.ndarray)
    block = array.base
    ring = ring_of(block)
    area_start = ring.offset + RING_HEADER
    assert area_start + BLOCK_HEADER <= block.offset, "a view before the ring's first payload"
    assert block.offset + block.nbytes <= area_start + ring.area, "a view past the ring"
    if side == "host":  # a view the host gives back must be a payload, or the release misfires
        assert ring.contains(block.offset, block.nbytes)
    start, end = array_bounds(array)
    assert block.address <= start and end <= block.address + block.nbytes
    assert block.sealed == (side == "worker")


def put(arena, array):
    """(segment id, payload, Ring) of a copy of ``array`` that ``arena`` put in its own ring."""
    _, _, [(mapping, ring, payload)], _ = arena.encode(INFER, 1, {"t": array})
    return arena.segment_id(mapping), payload, Ring(mapping, ring)


def test_a_worker_output_decodes_on_the_host_to_a_view_of_its_bytes(arenas):
    host, worker = arenas
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    seg_id, payload, ring = put(worker, expected)
    assert seg_id == 2
    desc = describe("y", expected, seg_id, payload)
    array = host.decode(protocol.pack([RESULT, 1, [desc], 24]))[2]["y"]
    np.testing.assert_array_equal(array, expected)
    assert ring.used > 0
    del array  # the host's view gives the block back to the worker's ring
    assert ring.used == 0


def test_a_host_input_decodes_on_the_worker_to_a_sealed_view_of_its_bytes(arenas):
    host, worker = arenas
    seg_id, payload, ring = put(host, np.arange(8, dtype=np.uint8))
    array = decode_one(worker, ("x", protocol.DTYPE_CODES[np.dtype("uint8")], 1, (8,), seg_id,
                                payload, 8))
    assert array.tobytes() == bytes(range(8))
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1
    del array  # the worker's view does not give the host's block back
    assert ring.used > 0
    ring.release(payload)


@pytest.mark.parametrize("strings", [["a", "bc", ""], [["ünï", "c😀de"]], [[""], [""]], []])
def test_a_string_tensor_travels_through_the_arena(arenas, strings):
    host, worker = arenas
    array = np.array(strings, dtype=str)
    seg_id, payload, ring = put(host, array[::-1] if array.ndim == 1 else array)
    sent = array[::-1] if array.ndim == 1 else array
    desc = describe("s", sent, seg_id, payload)
    got = decode_one(worker, desc)
    assert got.dtype == sent.dtype
    np.testing.assert_array_equal(got, sent)
    ring.release(payload)


@pytest.mark.parametrize("seg_id,payload,nbytes", [
    (2, 0, 8),                # not a payload of the ring
    (2, 2 ** 62, 8),          # far past the segment
    (2, None, 2 ** 40),       # longer than the ring
    (99, None, 8),            # a segment that does not exist
    (3, None, 8),             # an id the worker does not own
    (0, None, 8),             # the control segment
])
def test_a_table_of_bad_descriptors_raises_protocol_error(arenas, seg_id, payload, nbytes):
    """``None`` as the payload is replaced by a real, live payload of the worker's ring."""
    host, worker = arenas
    _, live, ring = worker.alloc(8)
    desc = ("y", protocol.DTYPE_CODES[np.dtype("uint8")], 1, (nbytes,), seg_id,
            live if payload is None else payload, nbytes)
    with pytest.raises(ope.ProtocolError):
        decode_one(host, desc)
    if ring.used:  # no Block was made; one that was made gave the block back when dropped
        ring.release(live)


def test_the_host_refuses_a_descriptor_naming_its_own_segment(arenas):
    host, _ = arenas
    seg_id, payload, ring = host.alloc(64)  # e.g. a model.empty buffer the caller holds
    try:
        with pytest.raises(ope.ProtocolError):
            decode_one(host, ("y", protocol.DTYPE_CODES[np.dtype("uint8")], 1, (64,), seg_id,
                              payload, 64))
    finally:
        assert ring.used > 0, "dropping the 'output' gave the caller's block back"
        ring.release(payload)


def test_shapes_and_widths_numpy_refuses_are_protocol_errors(arenas):
    """A zero dim does not excuse a product of the others past numpy's index range, and a
    string width numpy cannot make is refused too: the host's call fails, it does not crash."""
    host, _ = arenas
    with pytest.raises(ope.ProtocolError):
        protocol.unpack(protocol.pack([RESULT, 1, [("y", FLOAT32, 4, (0, 2 ** 62), 2, 4160, 0)], 0]))
    with pytest.raises(ope.ProtocolError):
        decode_one(host, ("y", FLOAT32, 4, (0, 2 ** 62), 2, 4160, 0))
    with pytest.raises(ope.ProtocolError):
        decode_one(host, ("s", STRING, 4 * (2 ** 30 - 1), (0,), 2, 4160, 0))
