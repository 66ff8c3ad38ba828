"""A worker's shared-memory arena: the segments that carry its messages and tensors.

Segments are POSIX shared memory named ``ope-<host pid>-<token>-<id>``, created exclusively and
owner-only (0600), sized up front with fallocate so that running out of /dev/shm is a clean
``ArenaFull`` rather than a SIGBUS on first touch. The owner pid in the name lets ``ope gc``
(and every host's start-up) remove segments whose host died; a worker's parent watchdog
(ope_native.exit_with_parent) removes its host's segments if the host dies first.

Segment 0 is created by the host and outlives worker restarts::

       0  u64 magic   "OPEARENA"
       8  u32 layout  version of this layout
      16  u64 size    of the segment
      24  u64 offset of the host-to-worker queue     (layout: ope/channel.py)
      32  u64 offset of the worker-to-host queue
      40  u64 offset of the host-to-worker data ring (layout: ope/ring.py)
    4096  the two queues, then the ring

Every other segment holds one data ring at offset 64 after the same magic, layout and size.
Each side allocates only from its own rings: the host from segment 0's ring and the odd ids it
adds, the worker from the even ids it adds (``first_id`` + 2k, so a restarted worker never
reuses an id whose blocks the caller may still hold). A side that runs out grows by a new
segment at least as large as everything it owns, up to ``max_bytes``; past that, ArenaFull.

A call's tensors travel as a tensor frame (ope/protocol.py) whose descriptors name (segment id,
payload offset, nbytes): :meth:`Arena.encode` puts the tensors in and makes the frame,
:meth:`Arena.decode` makes the views on the other side. A side maps the other side's segment
by name when a descriptor first names it, and checks every descriptor against that ring's
bounds before creating a view, so a lying peer can make it neither read nor write outside the
arena.
"""

import os
import re
import secrets
import struct

import posix_ipc
import psutil

import ope_native
from ope.channel import Channel
from ope.errors import ArenaFull, ProtocolError
from ope.protocol import DTYPE_CODES, DTYPES_BY_CODE, dtype_code, frame_message, string_dtype
from ope.ring import RING_HEADER, Ring, block_size

__all__ = ["Arena", "gc_segments", "segment_names", "SHM_DIR"]

SHM_DIR = "/dev/shm"
_MAGIC = 0x414E455241455045  # "OPEARENA"
_LAYOUT = 1
_HEADER = struct.Struct("<QI4xQQQQ")  # magic, layout, size, three offsets
_PAGE = 4096
_encode_frame = ope_native.encode_frame
_decode_frame = ope_native.decode_frame
_NAME = re.compile(r"^ope-(\d+)-([0-9a-f]+)-(\d+)$")
_MIB = 1 << 20


def _round_page(n):
    return -(-n // _PAGE) * _PAGE


def _create_segment(name, size):
    """Create, size and map a new owner-only segment; on any failure nothing is left behind."""
    try:
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600)
    except posix_ipc.ExistentialError as exc:
        raise ArenaFull(f"shared-memory segment {name} already exists: {exc}") from None
    try:
        try:
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as exc:
            raise ArenaFull(f"cannot reserve {size >> 20} MiB of shared memory for {name}: {exc}") from None
        return ope_native.Mapping(shm.fd, size, populate=True)
    except BaseException:
        shm.unlink()
        raise
    finally:
        shm.close_fd()


def _open_segment(name):
    try:
        shm = posix_ipc.SharedMemory("/" + name)
    except posix_ipc.ExistentialError:
        raise ProtocolError(f"peer named segment {name}, which does not exist") from None
    try:
        return ope_native.Mapping(shm.fd, shm.size, populate=True)
    finally:
        shm.close_fd()


def _check_header(mapping, name):
    if mapping.size < _HEADER.size:
        raise ProtocolError(f"segment {name} is too small to be an ope segment")
    magic, layout, size, *offsets = _HEADER.unpack_from(mapping, 0)
    if magic != _MAGIC or layout != _LAYOUT or size != mapping.size:
        raise ProtocolError(f"segment {name} has no valid ope header (layout {layout})")
    return offsets


def _worker_owned(seg_id):
    return seg_id > 0 and seg_id % 2 == 0


def segment_names(prefix):
    """Names in /dev/shm that belong to the arena ``prefix``."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix + "-"))
    except FileNotFoundError:
        return []


def _unlink(name):
    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        pass


def gc_segments():
    """Remove segments whose owning host process is gone; returns the names removed."""
    removed = []
    for name in segment_names("ope"):
        match = _NAME.match(name)
        if match and not psutil.pid_exists(int(match.group(1))):
            _unlink(name)
            removed.append(name)
    return removed


class Arena:
    """The segments of one worker's arena, as seen from one side.

    ``host`` is True on the host side. Use :meth:`create` (host) and :meth:`attach` (worker).
    A segment is known by its (Mapping, ring offset), the form ope_native's frame codec reads:
    our own in the order we made them (allocation tries the newest first), the peer's by id.
    """

    def __init__(self, prefix, host, max_bytes, next_id):
        self.prefix = prefix
        self.host = host
        self.max_bytes = max_bytes
        self._next_id = next_id
        self._own = []  # (segment id, Mapping, ring offset)
        self._peer = {}  # segment id -> (Mapping, ring offset)
        # What ope_native's frame codec needs of this side, made once (calls pass them on):
        # encode_frame: our rings, the dtype codes, and how to grow; decode_frame: this side,
        # the peer's rings, the dtypes by code, and how to map a segment the peer names.
        self.encoding = (self._own, DTYPE_CODES, dtype_code, self._grow)
        self.decoding = (host, self._peer, DTYPES_BY_CODE, string_dtype, self._map_peer_segment)
        self._queues = None
        self.channel = None

    # -- set-up -------------------------------------------------------------------------

    @classmethod
    def create(cls, *, queue_bytes=256 * 1024, ring_bytes=4 * _MIB, max_bytes=4096 * _MIB):
        """Host side: a new arena with segment 0 laid out and its channel ready."""
        arena = cls(f"ope-{os.getpid()}-{secrets.token_hex(4)}", True, max_bytes, next_id=1)
        queue_bytes = _round_page(queue_bytes)
        h2w_q, w2h_q, ring = _PAGE, _PAGE + queue_bytes, _PAGE + 2 * queue_bytes
        size = ring + _round_page(ring_bytes)
        mapping = _create_segment(arena.name_of(0), size)
        _HEADER.pack_into(mapping, 0, _MAGIC, _LAYOUT, size, h2w_q, w2h_q, ring)
        arena._queues = (h2w_q, w2h_q, queue_bytes)
        arena.reset_channel(mapping)
        mapping.ring_init(ring, size - ring)
        arena._own.append((0, mapping, ring))
        return arena

    @classmethod
    def attach(cls, prefix, first_id, max_bytes=4096 * _MIB):
        """Worker side: map segment 0 of the arena ``prefix``; new segments start at ``first_id``."""
        arena = cls(prefix, False, max_bytes, next_id=first_id)
        mapping = _open_segment(arena.name_of(0))
        h2w_q, w2h_q, ring = _check_header(mapping, arena.name_of(0))
        arena.channel = Channel(mapping, out_q=w2h_q, in_q=h2w_q)
        arena._peer[0] = (mapping, ring)
        return arena

    def reset_channel(self, mapping=None):
        """Host side: empty both queues (for a new worker) and return the host's channel."""
        mapping = mapping or self._own[0][1]
        h2w_q, w2h_q, size = self._queues
        Channel.init_queue(mapping, h2w_q, size)
        Channel.init_queue(mapping, w2h_q, size)
        self.channel = Channel(mapping, out_q=h2w_q, in_q=w2h_q)
        return self.channel

    def name_of(self, seg_id):
        return f"{self.prefix}-{seg_id}"

    # -- allocation from our own rings --------------------------------------------------

    def alloc(self, nbytes):
        """(segment id, payload offset, ring) of a new block in one of our rings, growing the
        arena if none has room. Raises ArenaFull past ``max_bytes``."""
        for seg_id, mapping, offset in reversed(self._own):
            ring = Ring(mapping, offset)
            payload = ring.alloc(nbytes)
            if payload is not None:
                return seg_id, payload, ring
        seg_id, mapping, offset = self._grow(nbytes)
        ring = Ring(mapping, offset)
        return seg_id, ring.alloc(nbytes), ring

    def new_block(self, nbytes):
        """(segment id, Block) of ``nbytes`` that returns to its ring when dropped."""
        seg_id, payload, ring = self.alloc(nbytes)
        return seg_id, ring.block(payload, nbytes)

    def _grow(self, nbytes):
        """(segment id, Mapping, ring offset) of a new own segment with room for ``nbytes``."""
        owned = self.own_bytes
        need = _round_page(_PAGE + RING_HEADER + block_size(nbytes))
        size = max(need, _round_page(owned))
        if owned + size > self.max_bytes:
            size = need
        if owned + size > self.max_bytes:
            raise ArenaFull(
                f"a tensor of {nbytes} bytes does not fit: the arena holds {owned} bytes "
                f"and may grow to {self.max_bytes} (raise arena_max_mb, or release held outputs)")
        seg_id = self._take_id()
        mapping = _create_segment(self.name_of(seg_id), size)
        _HEADER.pack_into(mapping, 0, _MAGIC, _LAYOUT, size, 0, 0, 0)
        mapping.ring_init(_PAGE, size - _PAGE)
        self._own.append((seg_id, mapping, _PAGE))
        return self._own[-1]

    def _take_id(self):
        seg_id = self._next_id
        self._next_id += 2
        return seg_id

    # -- the peer's blocks ----------------------------------------------------------------

    def segment_mapping(self, seg_id):
        own = [m for i, m, _ in self._own if i == seg_id]
        return own[0] if own else self._peer[seg_id][0]

    def segment_id(self, mapping):
        """Id of one of this side's own segments by its Mapping, or None."""
        return next((i for i, m, _ in self._own if m is mapping), None)

    def owns(self, mapping):
        """Whether ``mapping`` is one of this side's own segments."""
        return self.segment_id(mapping) is not None

    # -- tensor frames ------------------------------------------------------------------

    def encode(self, kind, call_id, tensors, in_place=False):
        """The frame (ope/protocol.py) of a call's ``tensors`` (name -> ndarray), each put in
        the arena: copied into a new block of our rings (grown if none has room; ArenaFull
        past ``max_bytes``), or, with ``in_place``, named where it is if it already lies in
        one of our segments (an array from model.empty), and made read-only if it was not.

        Returns (frame, bytes copied, scratch, sealed), where scratch lists the (Mapping,
        ring, payload) blocks copied into and sealed the arrays made read-only, for the sender
        to give back (ope_native.release_inputs) when the peer is done with them. None, with
        nothing allocated, if a value is not an ndarray of a dtype a frame can carry."""
        own, codes, code_of, grow = self.encoding
        return _encode_frame(kind, call_id, tensors, own, in_place, codes, code_of, grow)

    def decode(self, data):
        """The message of a tensor frame the peer sent, its tensors as views on the peer's
        blocks. Every range is checked against the ring it names (in ope_native) before the
        view exists: a lying peer can make this side neither read nor write outside the
        arena, only raise ProtocolError.

        On the host (outputs) a view's block goes back to the worker's ring when the caller
        drops it; on the worker (inputs) views are sealed and the host gives the blocks back."""
        try:
            kind, call_id, copied, tensors = _decode_frame(data, *self.decoding)
        except (ValueError, TypeError, OverflowError) as exc:  # numpy's refusals too
            raise ProtocolError(f"bad tensor frame ({len(data)} bytes) from the peer: {exc}") from None
        return frame_message(kind, call_id, copied, tensors)

    def _map_peer_segment(self, seg_id):
        """(Mapping, ring offset) of a segment the peer names for the first time."""
        if _worker_owned(seg_id) != self.host:
            raise ProtocolError(f"peer named segment id {seg_id}, which it does not own")
        name = self.name_of(seg_id)
        mapping = _open_segment(name)
        _check_header(mapping, name)
        self._peer[seg_id] = (mapping, _PAGE)
        return self._peer[seg_id]

    # -- accounting and teardown --------------------------------------------------------

    def _rings(self):
        # list(): the receiving thread may map a peer segment meanwhile.
        pairs = [(m, offset) for _, m, offset in self._own] + list(self._peer.values())
        return [Ring(m, offset) for m, offset in pairs]

    def used_bytes(self):
        return sum(ring.used for ring in self._rings())

    def high_water_bytes(self):
        return sum(ring.high_water for ring in self._rings())

    @property
    def own_bytes(self):
        return sum(m.size for _, m, _ in self._own)

    def forget_peer_segments(self):
        """Host side, after its worker died: drop our references to the worker's segments
        (views the caller holds keep their mappings alive) and unlink their names."""
        self._peer.clear()
        for name in segment_names(self.prefix):
            if _worker_owned(int(name.rsplit("-", 1)[1])):
                _unlink(name)

    def unlink_all(self):
        """Remove every name of this arena from /dev/shm. Mappings stay valid while used."""
        for name in segment_names(self.prefix):
            _unlink(name)

    def close(self):
        """Unlink all names and drop our references; outputs the caller holds stay readable."""
        if self.channel is not None:
            self.channel.close()
        if self.host:
            self.unlink_all()
        self._own.clear()
        self._peer.clear()
        self.channel = None
        self.encoding = self.decoding = None  # they hold bound methods: no cycle outlives close
