"""The arena (ope/bridge/arena.py): sealed memfd segments handed over as descriptors, growth up to a
maximum, clean-up, and the worker's copy-on-write view of the host's blocks.

Every arena a test makes is closed at teardown, and the test checks that its descriptors are
closed and nothing appeared in /dev/shm.
"""

import ctypes
import fcntl
import os
import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ope
import ope_native
from ope.bridge import protocol
from ope.bridge.arena import Arena
from ope.bridge.ring import block_size

from conftest import attach_worker as attach, describe

KIB, MIB = 1 << 10, 1 << 20


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


def _our_shm_names():
    """Names this process made in /dev/shm (other processes on the machine may make theirs)."""
    return {name for name in os.listdir("/dev/shm") if f"-{os.getpid()}-" in name}


@pytest.fixture
def make_arena():
    """Arena.create with small defaults; closes every arena at teardown and checks that no
    descriptor of theirs is left open and no name was made in /dev/shm."""
    made = []
    fds_before, shm_before = _open_fds(), _our_shm_names()

    def make(**options):
        options = {"queue_bytes": 4 * KIB, "ring_bytes": 64 * KIB, "max_bytes": 4 * MIB, **options}
        arena = Arena.create(**options)
        made.append(arena)
        return arena

    yield make
    for arena in made:
        arena.close()
    assert _open_fds() <= fds_before, "close() left descriptors open"
    assert _our_shm_names() <= shm_before, "an arena made a name in /dev/shm"


@pytest.fixture
def pair(make_arena):
    """(host, worker): a host arena and a worker attached to it."""
    host = make_arena()
    worker = attach(host)
    yield host, worker
    worker.close()


def _memfd_links():
    """/proc/self/fd targets of this process's ope segments."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if "memfd:ope-arena" in link]


def test_segments_are_sealed_memfds_with_no_name_in_dev_shm(make_arena):
    shm_before = _our_shm_names()
    arena = make_arena()
    assert _our_shm_names() == shm_before
    assert len(_memfd_links()) == 1  # the first data segment; no worker yet
    (fd,) = arena.descriptors().values()
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == \
        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 4096)  # nobody can shrink a segment under another's mapping
    assert arena.used_bytes() == 0 and arena.own_bytes > 64 * KIB


def test_allocating_more_than_the_ring_holds_grows_by_a_new_segment(make_arena):
    arena = make_arena()
    before = arena.own_bytes
    seg_id, payload, ring = arena.alloc(200 * KIB)
    assert seg_id == 3  # the host's segments have odd ids
    assert len(_memfd_links()) == 2
    assert arena.own_bytes > before
    assert ring.used == block_size(200 * KIB)
    memoryview(arena.segment_mapping(seg_id))[payload:payload + 200 * KIB] = b"\x01" * (200 * KIB)
    small = arena.alloc(100)  # still room for small ones, in whichever ring has it
    assert small[0] in (1, 3)
    assert arena.used_bytes() == block_size(200 * KIB) + block_size(100)
    ring.release(payload)
    small[2].release(small[1])
    assert arena.used_bytes() == 0
    assert arena.high_water_bytes() >= block_size(200 * KIB) + block_size(100)


def test_growth_past_max_bytes_raises_arena_full_and_small_allocations_go_on(make_arena):
    arena = make_arena(max_bytes=1 * MIB)
    with pytest.raises(ope.ArenaFull):
        arena.alloc(2 * MIB)
    held = [arena.alloc(200 * KIB) for _ in range(3)]  # grows as far as it may
    with pytest.raises(ope.ArenaFull):
        while True:
            held.append(arena.alloc(200 * KIB))
    assert arena.own_bytes <= 1 * MIB
    seg_id, payload, ring = arena.alloc(1 * KIB)
    ring.release(payload)
    for _, payload, ring in held:
        ring.release(payload)
    assert arena.alloc(200 * KIB) is not None  # space that came back is used again


def test_new_block_gives_its_space_back_when_dropped(make_arena):
    arena = make_arena()
    seg_id, block = arena.new_block(1000)
    array = np.frombuffer(block, np.uint8)
    del block
    assert arena.used_bytes() == block_size(1000)
    del array
    assert arena.used_bytes() == 0


def test_close_closes_every_descriptor_and_can_be_repeated(make_arena, pair):
    host, worker = pair
    host.alloc(200 * KIB)  # segment 3, handed to the worker over the socket
    worker.alloc(10)  # the worker owns no ring yet: segment 2
    worker.close()
    host.close()
    assert _memfd_links() == []
    host.close()


def test_a_view_stays_readable_after_close(make_arena):
    arena = make_arena()
    seg_id, block = arena.new_block(16)
    array = np.frombuffer(block, np.uint8)
    array[:] = 7
    del block
    arena.close()
    assert _memfd_links() == []  # the mapping alone keeps the memory
    assert array.sum() == 7 * 16


UINT8 = protocol.DTYPE_CODES[np.dtype("uint8")]


def peer_view(arena, seg_id, payload, nbytes):
    """The Block under the uint8 view ``arena`` makes of a range its peer names in a frame."""
    tensors = [("t", UINT8, 1, (nbytes,), seg_id, payload, nbytes)]
    message = [protocol.RESULT, 1, tensors, 0] if arena.host else [protocol.INFER, 1, tensors]
    return arena.decode(protocol.pack(message))[2]["t"].base


def test_the_worker_sees_the_hosts_blocks_as_sealed_read_only_views(pair):
    host, worker = pair
    seg_id, block = host.new_block(64)
    host_view = np.frombuffer(block, np.float32)
    host_view[:] = np.arange(16)
    peer = peer_view(worker, seg_id, block.offset, 64)
    assert peer.sealed and memoryview(peer).readonly
    seen = np.frombuffer(peer, np.float32)
    np.testing.assert_array_equal(seen, np.arange(16))
    with pytest.raises(ValueError):
        seen[0] = 1
    host_view[0] = 42  # the same bytes, not a copy
    assert seen[0] == 42
    del peer, seen  # the worker's view does not give the host's block back
    assert host.used_bytes() == block_size(64)


def test_a_write_through_the_workers_mapping_never_reaches_the_host(pair):
    """What torch does to a read-only numpy input (it ignores the flag): the write lands in
    the worker's private copy of the page, and the host's bytes stay as they were."""
    host, worker = pair
    seg_id, block = host.new_block(64)
    host_view = np.frombuffer(block, np.float32)
    host_view[:] = 1
    peer = peer_view(worker, seg_id, block.offset, 64)
    ctypes.memset(peer.address, 0xFF, 64)
    assert np.frombuffer(peer, np.uint8).tolist() == [0xFF] * 64
    np.testing.assert_array_equal(host_view, np.ones(16, np.float32))
    for fd in worker.descriptors().values():  # and no way to write through its descriptors
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 4096)
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)


def test_the_worker_maps_a_segment_the_host_grew_later(pair):
    host, worker = pair
    seg_id, block = host.new_block(200 * KIB)
    assert seg_id == 3
    np.frombuffer(block, np.uint8)[-1] = 9
    peer = peer_view(worker, seg_id, block.offset, 200 * KIB)
    assert np.frombuffer(peer, np.uint8)[-1] == 9


def test_the_host_sees_the_workers_blocks_and_gives_them_back(pair):
    host, worker = pair
    seg_id, payload, ring = worker.alloc(32)
    assert seg_id == 2  # the worker's segments have even ids from first_id
    memoryview(worker.segment_mapping(seg_id))[payload:payload + 32] = bytes(range(32))
    output = peer_view(host, seg_id, payload, 32)
    assert not output.sealed
    assert bytes(output) == bytes(range(32))
    assert ring.used == block_size(32)
    del output
    assert ring.used == 0


@pytest.mark.parametrize("seg_id,offset,nbytes", [
    (1, 1, 8),  # misaligned
    (1, 0, 8),  # the segment header
    (1, None, 1 << 30),  # runs past the ring
    (3, 4096 + 128, 8),  # a host segment that does not exist
    (2, 4096 + 128, 8),  # a segment the worker owns
    (0, 4096 + 128, 8),  # the control segment
])
def test_the_worker_refuses_a_bad_range_with_protocol_error(pair, seg_id, offset, nbytes):
    host, worker = pair
    _, payload, ring = host.alloc(8)
    with pytest.raises(ope.ProtocolError):
        peer_view(worker, seg_id, payload if offset is None else offset, nbytes)
    ring.release(payload)


def _offer(spec, seg_id, fd):
    """Offer ``fd`` as segment ``seg_id`` on the worker's end of the socket named in the
    attach ``spec``, as a worker that skipped every check would."""
    fields = dict(field.split("=", 1) for field in spec.split(";"))
    raw = socket.socket(fileno=os.dup(int(fields["socket"])))
    try:
        socket.send_fds(raw, [struct.pack("<Q", seg_id)], [fd])
    finally:
        raw.close()


@pytest.mark.parametrize("make_fd", ["unsealed memfd", "regular file", "pipe"])
def test_the_host_refuses_a_segment_that_could_shrink_under_it(make_arena, tmp_path, make_fd):
    host = make_arena()
    spec, _ = host.connect()
    worker = Arena.attach(spec, first_id=2, max_bytes=4 * MIB)
    if make_fd == "unsealed memfd":
        fd = os.memfd_create("ope-arena")
        os.ftruncate(fd, 64 * KIB)
    elif make_fd == "regular file":
        fd = os.open(tmp_path / "segment", os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 64 * KIB)
    else:
        fd, other = os.pipe()
        os.close(other)
    try:
        _offer(spec, 2, fd)
    finally:
        os.close(fd)
    with pytest.raises(ope.ProtocolError, match="segment 2"):
        peer_view(host, 2, 4096 + 64, 8)
    worker.close()


def test_the_host_refuses_a_segment_named_but_never_handed_over(pair):
    host, _ = pair
    with pytest.raises(ope.ProtocolError, match="never handed it over"):
        peer_view(host, 2, 4096 + 64, 8)


def test_attach_refuses_a_segment_that_is_not_an_arena():
    fd = os.memfd_create("not-an-arena")
    os.ftruncate(fd, 8192)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(ope.ProtocolError):
            Arena.attach(f"control={fd};socket={theirs.detach()};segments=", first_id=2)
    finally:
        ours.close()


def test_the_channel_connects_host_and_worker(pair):
    host, worker = pair
    assert host.channel.send(b"load", timeout_s=0)
    assert worker.channel.receive(timeout_s=0) == b"load"
    assert worker.channel.send(b"ready", timeout_s=0)
    assert host.channel.receive(timeout_s=0) == b"ready"


def test_connect_gives_a_new_worker_a_fresh_channel(pair):
    host, worker = pair
    assert host.channel.send(b"stale", timeout_s=0)
    worker.close()
    fresh = attach(host, first_id=4)
    try:
        assert not host.channel.closed
        assert fresh.channel.receive(timeout_s=0) is None
        assert host.channel.send(b"new", timeout_s=0)
        assert fresh.channel.receive(timeout_s=0) == b"new"
    finally:
        fresh.close()


def test_the_control_segment_header_describes_the_layout(pair):
    host, _ = pair
    mapping = host.channel.mapping
    magic, layout, size, h2w, w2h = struct.unpack_from("<QI4xQQQ", mapping, 0)
    assert magic == 0x414E455241455045 and layout == 2 and size == mapping.size
    assert h2w == 4096 and w2h == h2w + 4 * KIB and size == w2h + 4 * KIB


# -- tensor frames straight into and out of the arena ---------------------------------------

SENDABLE = {
    "float32 matrix": np.arange(6, dtype=np.float32).reshape(2, 3),
    "strided view": np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 3), np.int16),
    "bools": np.array([True, False, True]),
    "strings": np.array([["ünï", ""], ["c😀de", "x"]]),
}


@pytest.mark.parametrize("kind", [protocol.INFER, protocol.RESULT])
def test_encode_copies_each_tensor_once_and_the_peer_decodes_the_same_values(pair, kind):
    host, worker = pair
    sender, receiver = (host, worker) if kind == protocol.INFER else (worker, host)
    before = sender.used_bytes()
    frame, copied, scratch, sealed = sender.encode(kind, 7, dict(SENDABLE))
    assert copied == sum(a.nbytes for a in SENDABLE.values()) and sealed == []
    # The frame is the one the reference codec (protocol.pack of descriptors) describes.
    message = protocol.unpack(frame)
    assert message[:2] == [kind, 7]
    for (name, array), desc, (mapping, _, payload) in zip(SENDABLE.items(), message[2], scratch):
        assert desc == describe(name, array, sender.segment_id(mapping), payload)
    received = receiver.decode(frame)
    assert received[:2] == [kind, 7] and received[2].keys() == SENDABLE.keys()
    for name, array in SENDABLE.items():
        got = received[2][name]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    del received, got
    for mapping, ring, payload in scratch:
        if kind == protocol.INFER:  # the host gives its input blocks back after the call
            mapping.ring_release(ring, payload)
    assert sender.used_bytes() == before


def test_an_array_from_the_arena_is_sent_where_it_lies(pair):
    host, worker = pair
    seg_id, block = host.new_block(4 * 24)
    array = np.ndarray((4, 6), np.float32, block)
    array[...] = np.arange(24).reshape(4, 6)
    frozen = np.ndarray((2,), np.float32, block, offset=8)
    frozen.flags.writeable = False
    tensors = {"whole": array, "rows": array[1:3], "columns": array[:, ::2], "frozen": frozen}
    frame, copied, scratch, sealed = host.encode(protocol.INFER, 1, tensors, in_place=True)
    # Named where they lie, and read-only while the call is in flight; the one that was
    # read-only already is not the sender's to unseal.
    assert [a is b for a, b in zip(sealed, [array, tensors["rows"]])] == [True, True]
    assert len(sealed) == 2 and not any(a.flags.writeable for a in tensors.values() if a is not tensors["columns"])
    assert copied == tensors["columns"].nbytes and len(scratch) == 1
    descs = {d[0]: d for d in protocol.unpack(frame)[2]}
    assert descs["whole"][4:6] == (seg_id, block.offset)
    assert descs["rows"][4:6] == (seg_id, block.offset + 6 * 4)  # one row in
    received = worker.decode(frame)[2]
    for name, sent in tensors.items():
        np.testing.assert_array_equal(received[name], sent)
    ope_native.release_inputs(scratch, sealed)
    assert array.flags.writeable and tensors["rows"].flags.writeable and not frozen.flags.writeable
    assert host.used_bytes() == block_size(array.nbytes), "only the arena array's block is left"
    frame, copied, scratch, sealed = host.encode(protocol.INFER, 2, {"whole": array})
    assert copied == array.nbytes and sealed == [], "without in_place every array is copied"
    ope_native.release_inputs(scratch, sealed)


def test_release_inputs_gives_back_every_good_block_and_reports_the_first_bad_one(pair):
    host, _ = pair
    before = host.used_bytes()
    _, _, scratch, _ = host.encode(protocol.INFER, 1, {"a": np.ones(4), "b": np.ones(4)})
    (mapping, ring, first), (_, _, second) = scratch
    bad = [(mapping, ring, 1), (mapping, ring, first), (mapping, ring, first + 64), (mapping, ring, second)]
    with pytest.raises(ValueError, match="offset 1 is not a block of the ring"):
        ope_native.release_inputs(bad, [])
    assert host.used_bytes() == before


def test_release_inputs_leaves_an_array_whose_block_was_sealed_for_good_read_only(pair):
    host, _ = pair
    _, block = host.new_block(64)
    array = np.ndarray((16,), np.float32, block)
    _, _, scratch, sealed = host.encode(protocol.INFER, 1, {"a": array}, in_place=True)
    assert sealed == [array] and not array.flags.writeable
    block.seal()  # model.seal() while the call was in flight
    ope_native.release_inputs(scratch, sealed)
    assert not array.flags.writeable


@pytest.mark.parametrize("bad", [[1.0, 2.0], np.array([object()]), np.zeros(2, ">f4")],
                         ids=["a list", "object dtype", "big-endian float"])
def test_encode_of_what_a_frame_cannot_carry_is_none_and_allocates_nothing(pair, bad):
    host, _ = pair
    tensors = {"fine": np.ones(64, np.float32), "bad": bad}
    assert host.encode(protocol.INFER, 1, tensors) is None
    assert host.used_bytes() == 0


def test_encode_grows_the_arena_for_a_big_tensor_and_the_peer_maps_the_new_segment(pair):
    host, worker = pair
    big = np.arange(100 * KIB, dtype=np.uint8)
    frame, copied, scratch, _ = host.encode(protocol.INFER, 1, {"big": big})
    assert host.segment_id(scratch[0][0]) == 3
    np.testing.assert_array_equal(worker.decode(frame)[2]["big"], big)
    scratch[0][0].ring_release(*scratch[0][1:])


def test_encode_past_the_arena_limit_raises_arena_full_and_keeps_nothing(make_arena):
    host = make_arena(max_bytes=256 * KIB)
    with pytest.raises(ope.ArenaFull):
        host.encode(protocol.INFER, 1, {"small": np.ones(8), "huge": np.ones(MIB)})
    assert host.used_bytes() == 0


@st.composite
def sendable_arrays(draw):
    """Any array a frame carries: every dtype code, 0 to 3 dims, C order or a strided view."""
    dtype = np.dtype(draw(st.sampled_from([d for d in ope.spec.DTYPES if d != "string"] + ["U3"])))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    array = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.int64).reshape(shape)
    array = array.astype(str).astype(dtype) if dtype.kind == "U" else array.astype(dtype)
    if array.ndim and draw(st.booleans()):
        array = array[..., ::-1]
    return array


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=8), sendable_arrays(), max_size=4),
       kind=st.sampled_from([protocol.INFER, protocol.RESULT]))
def test_what_one_side_encodes_the_other_decodes_to_the_same_arrays(pair, tensors, kind):
    host, worker = pair
    sender, receiver = (host, worker) if kind == protocol.INFER else (worker, host)
    frame, copied, scratch, _ = sender.encode(kind, 3, tensors)
    assert copied == sum(a.nbytes for a in tensors.values()) and len(scratch) == len(tensors)
    received = receiver.decode(frame)[2]
    assert received.keys() == tensors.keys()
    for name, array in tensors.items():
        assert received[name].dtype == array.dtype and received[name].shape == array.shape
        np.testing.assert_array_equal(received[name], array)
    del received
    if kind == protocol.INFER:
        for mapping, ring, payload in scratch:
            mapping.ring_release(ring, payload)
    assert host.used_bytes() == 0 and worker.used_bytes() == 0


def test_encode_holds_its_tensors_while_a_callback_changes_the_callers_dict(pair):
    """Callbacks (and big copies, which let other threads run) may see the caller's dict
    change during encode_frame: the arrays and names it encodes must stay alive."""
    host, worker = pair
    tensors = {"s": np.array(["ab", "c"]), "x": np.arange(4.0)}

    def code_of(dtype):  # asked for the string dtype, which has no fixed code
        tensors.clear()
        return protocol.dtype_code(dtype)

    frame, copied, scratch, _ = ope_native.encode_frame(
        protocol.INFER, 1, tensors, host.encoding[0], False, protocol.DTYPE_CODES, code_of,
        host.encoding[3])
    received = worker.decode(frame)[2]
    assert list(received) == ["s", "x"]
    np.testing.assert_array_equal(received["s"], ["ab", "c"])
    np.testing.assert_array_equal(received["x"], np.arange(4.0))
    del received
    for mapping, ring, payload in scratch:
        mapping.ring_release(ring, payload)
