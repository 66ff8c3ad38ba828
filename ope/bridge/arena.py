"""A worker's shared-memory arena: the segments that carry its messages and tensors.

Segments are anonymous memory files (``memfd_create``) sealed against shrinking and growing,
so no process can truncate one under another's mapping (the SIGBUS of a shrunk file), and
they have no name: nothing in /dev/shm to squat on, guess or leak after ``kill -9``; a segment
lives exactly as long as some process holds its descriptor or a mapping of it. They pass
between host and worker as descriptors: inherited when the worker starts, and over a Unix
socket when a side grows.

Segment ids:

* ``0``, the *control* segment: the two message queues (ope/bridge/channel.py). The host makes a new
  one for every worker it starts, so garbage an old worker wrote there is never read again.
  A worker can be started while another is connected (a standby, :meth:`Arena.prepare`) and
  installed later (:meth:`Arena.adopt`): its control segment and socket wait in a
  :class:`Link` meanwhile, and only the host's data segments made since go to it then.
* odd ids, the host's data segments (inputs). The worker gets read-only descriptors and maps
  them copy-on-write: it reads the host's bytes in place, a model that writes into an input
  changes only its own private copy, and nothing the worker does can change the caller's
  arrays. They outlive worker restarts, so arrays from ``model.empty`` stay valid.
* even ids from ``first_id``, the worker's own data segments (outputs), ``first_id + 2k``: a
  restarted worker never reuses an id whose blocks the caller may still hold. The host checks
  the seals of every segment a worker hands it before mapping it.

Layout (little-endian)::

    every segment
       0  u64 magic   "OPEARENA"
       8  u32 layout  version of this layout
      16  u64 size    of the segment
    data segment
      40  u32 retired  set by the owner when it gave the segment up (Arena.retire_empty)
    control segment
      24  u64 offset of the host-to-worker queue     (layout: ope/bridge/channel.py)
      32  u64 offset of the worker-to-host queue
    4096  the two queues
    4096  a data ring (layout: ope/bridge/ring.py)

    socket message: u64 segment id, with the segment's descriptor attached (SCM_RIGHTS)

Each side allocates only from its own rings. A side that runs out grows by a new segment at
least as large as everything it owns, up to ``max_bytes`` (past that, ArenaFull), and sends
its descriptor before any frame that names it. A call's tensors travel as a tensor frame
(ope/bridge/protocol.py) whose descriptors name (segment id, payload offset, nbytes):
:meth:`Arena.encode` puts the tensors in and makes the frame, :meth:`Arena.decode` makes the
views on the other side, checking every descriptor against the named ring's bounds first, so
a lying peer can make this side neither read nor write outside the arena.

Shrinking: a side gives a grown segment of its own back once its ring has held no block for
a while (:meth:`Arena.retire_empty`): no block means nobody holds anything there, neither an
output the caller keeps nor an input in flight (each is a USED block until given back), and
only the owner allocates, so none can appear meanwhile. The owner sets ``retired`` in the
segment's header, stops allocating there and unmaps it; the peer drops its mapping when it
next looks (:meth:`Arena.forget_retired`), and the memory is gone once both have. The owner
never names a retired segment again, so the peer never needs it back.
"""

import array
import fcntl
import os
import socket
import struct
import time

import numpy as np

import ope_native
from ope.bridge.channel import Channel
from ope.errors import ArenaFull, ProtocolError
from ope.bridge.protocol import DTYPE_CODES, DTYPES_BY_CODE, dtype_code, frame_message, string_dtype
from ope.bridge.ring import RING_HEADER, Ring, block_size

_ALLOCS = ope_native.LAYOUT["R_ALLOCS"]

__all__ = ["Arena", "Link", "SEGMENT_NAME", "block_under"]

SEGMENT_NAME = "ope-arena"  # what /proc/PID/maps shows: "/memfd:ope-arena (deleted)"
_MAGIC = 0x414E455241455045  # "OPEARENA"
_LAYOUT = 2
_HEADER = struct.Struct("<QI4xQQQ")  # magic, layout, size, two queue offsets
_OFFER = struct.Struct("<Q")  # a socket message: the segment id of the attached descriptor
_PAGE = 4096
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_encode_frame = ope_native.encode_frame
_decode_frame = ope_native.decode_frame
_MIB = 1 << 20
_RETIRED = 40  # u32 in a data segment's header (above)


def _round_page(n):
    return -(-n // _PAGE) * _PAGE


def _new_segment(size):
    """A sealed memfd of ``size`` bytes, reserved up front so that running out of memory is a
    clean ArenaFull rather than a SIGBUS on first touch. Returns its descriptor."""
    fd = os.memfd_create(SEGMENT_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            raise ArenaFull(f"cannot reserve {size >> 20} MiB of shared memory: {exc}") from exc
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_only(fd):
    """A read-only descriptor of the same memory file: what the worker gets of the host's
    data, so that it cannot map it writable and shared."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def _checked_size(fd, seg_id):
    """Size of a segment the peer handed over, after checking that it is a memory file sealed
    against shrinking and growing (else a truncate could SIGBUS this process)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ProtocolError(f"peer handed segment {seg_id} as a descriptor that is not a "
                            f"sealable memory file: {exc}") from exc
    if seals & _SEALS != _SEALS:
        raise ProtocolError(f"peer handed segment {seg_id} without seals against shrinking "
                            f"and growing (seals {seals:#x})")
    return os.fstat(fd).st_size


def _check_header(mapping, seg_id):
    if mapping.size < _HEADER.size:
        raise ProtocolError(f"segment {seg_id} is too small to be an ope segment")
    magic, layout, size, *offsets = _HEADER.unpack_from(mapping, 0)
    if magic != _MAGIC or layout != _LAYOUT or size != mapping.size:
        raise ProtocolError(f"segment {seg_id} has no valid ope header (layout {layout})")
    return offsets


def _receive_offer(sock):
    """(data, descriptors) of the next socket message, without waiting; received descriptors
    are close-on-exec. (socket.recv_fds ignores its flags before Python 3.12.)"""
    size = array.array("i").itemsize
    data, ancillary, _, _ = sock.recvmsg(_OFFER.size + 1, socket.CMSG_SPACE(4 * size),
                                         socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % size])
    return data, list(fds)


def block_under(array):
    """The ope_native.Block under ``array`` (through any chain of views), or None."""
    base = array.base
    while type(base) is np.ndarray:
        base = base.base
    return base if type(base) is ope_native.Block else None


class Link:
    """The host's end of one worker's connection to the arena before :meth:`Arena.adopt`
    installs it: the worker's control segment (``channel``), the socket segments travel over,
    and the ids of the host's data segments the worker got at its start (``handed``)."""

    __slots__ = ("channel", "socket", "handed")

    def __init__(self, channel, sock, handed):
        self.channel, self.socket, self.handed = channel, sock, handed

    def close(self):
        """For a worker that is never adopted: wake its waits and drop the socket."""
        self.channel.close()
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _worker_owned(seg_id):
    return seg_id > 0 and seg_id % 2 == 0


class Arena:
    """The segments of one worker's arena, as seen from one side.

    ``host`` is True on the host side. Use :meth:`create` and :meth:`connect` (host) and
    :meth:`attach` (worker). A segment is known by its (Mapping, ring offset), the form
    ope_native's frame codec reads: our own in the order we made them (allocation tries the
    newest first), the peer's by id.
    """

    def __init__(self, host, max_bytes, next_id):
        self.host = host
        self.max_bytes = max_bytes
        self._next_id = next_id
        self._own = []  # (segment id, Mapping, ring offset)
        self._own_fds = {}  # host: segment id -> descriptor, to hand to each new worker
        self._peer = {}  # segment id -> (Mapping, ring offset)
        self._peer_fds = {}  # worker: segment id -> read-only descriptor, to map again
        self._offered = {}  # descriptors received ahead of the frame that names them
        self._socket = None
        self._quiet = {}  # own segment id -> (ring allocations, monotonic time) when last seen
        self._queues = None
        self.channel = None
        # What ope_native's frame codec needs of this side, made once (calls pass them on):
        # encode_frame: our rings, the dtype codes, and how to grow; decode_frame: this side,
        # the peer's rings, the dtypes by code, and how to map a segment the peer names.
        self.encoding = (self._own, DTYPE_CODES, dtype_code, self._grow)
        self.decoding = (host, self._peer, DTYPES_BY_CODE, string_dtype, self._map_peer_segment)

    # -- set-up -------------------------------------------------------------------------

    @classmethod
    def create(cls, *, queue_bytes=256 * 1024, ring_bytes=4 * _MIB, max_bytes=4096 * _MIB):
        """Host side: a new arena with its first data segment; :meth:`connect` adds a worker."""
        arena = cls(True, max_bytes, next_id=1)
        queue_bytes = _round_page(queue_bytes)
        arena._queues = (_PAGE, _PAGE + queue_bytes, queue_bytes)
        arena._add_own_segment(_PAGE + _round_page(ring_bytes))
        return arena

    def connect(self):
        """Host side: a fresh control segment and socket for a new worker, installed at once
        (:meth:`prepare` then :meth:`adopt`). Returns (spec, fds) as :meth:`prepare` does."""
        link, spec, fds = self.prepare()
        self.adopt(link)
        return spec, fds

    def prepare(self):
        """Host side: a :class:`Link` for a worker to come, with its own control segment and
        socket, leaving the current worker connected (a standby is started this way and
        installed later by :meth:`adopt`). Returns (link, spec, fds): the worker's
        :meth:`attach` takes ``spec`` and needs the descriptors ``fds`` (pass them to the
        process, then close them here), among them read-only ones of every data segment of
        ours so far."""
        h2w_q, w2h_q, queue_bytes = self._queues
        size = w2h_q + queue_bytes
        control_fd = _new_segment(size)
        fds = [control_fd]
        try:
            mapping = ope_native.Mapping(control_fd, size, populate=True)
            _HEADER.pack_into(mapping, 0, _MAGIC, _LAYOUT, size, h2w_q, w2h_q)
            Channel.init_queue(mapping, h2w_q, queue_bytes)
            Channel.init_queue(mapping, w2h_q, queue_bytes)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.append(theirs.detach())
            fds.extend(_read_only(fd) for fd in self._own_fds.values())
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        link = Link(Channel(mapping, out_q=h2w_q, in_q=w2h_q), ours, set(self._own_fds))
        segments = ",".join(f"{i}:{fd}" for i, fd in zip(self._own_fds, fds[2:]))
        return link, f"control={control_fd};socket={fds[1]};segments={segments}", fds

    def adopt(self, link):
        """Host side: make ``link``'s worker the connected one, the previous worker's segments
        forgotten; data segments of ours made since :meth:`prepare` are handed over now,
        before any frame can name them. No copy and no wait: the worker mapped the rest at
        its start."""
        self.disconnect()
        self._socket, self.channel = link.socket, link.channel
        link.socket = None  # the arena owns it from now on
        for seg_id, fd in self._own_fds.items():
            if seg_id not in link.handed:
                self._offer(seg_id, fd)

    def disconnect(self):
        """Host side, when its worker is gone: close the channel and drop our references to
        the worker's segments (views the caller holds keep their mappings alive)."""
        if self.channel is not None:
            self.channel.close()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._peer.clear()
        self._close_offered()

    @classmethod
    def attach(cls, spec, first_id, max_bytes=4096 * _MIB):
        """Worker side: the arena that :meth:`connect` described in ``spec``; this side owns
        the descriptors it names from now on. New segments start at ``first_id``."""
        arena = cls(False, max_bytes, next_id=first_id)
        fields = dict(item.split("=", 1) for item in spec.split(";"))
        control_fd = int(fields["control"])
        try:
            arena._socket = socket.socket(fileno=int(fields["socket"]))
            for item in filter(None, fields["segments"].split(",")):
                seg_id, fd = map(int, item.split(":"))
                arena._peer_fds[seg_id] = fd
            mapping = ope_native.Mapping(control_fd, os.fstat(control_fd).st_size, populate=True)
            h2w_q, w2h_q = _check_header(mapping, 0)
        except BaseException:
            arena.close()
            raise
        finally:
            os.close(control_fd)
        arena.channel = Channel(mapping, out_q=w2h_q, in_q=h2w_q)
        return arena

    def _add_own_segment(self, size):
        """Create, lay out and map a new segment of ours; returns (id, Mapping, ring offset)."""
        fd = _new_segment(size)
        try:
            mapping = ope_native.Mapping(fd, size, populate=True)
            _HEADER.pack_into(mapping, 0, _MAGIC, _LAYOUT, size, 0, 0)
            mapping.ring_init(_PAGE, size - _PAGE)
            seg_id = self._next_id
            self._next_id += 2
            self._offer(seg_id, fd)
        except BaseException:
            os.close(fd)
            raise
        if self.host:
            self._own_fds[seg_id] = fd  # every later worker gets it too
        else:
            os.close(fd)  # the mapping keeps the memory; the host holds its own descriptor
        self._own.append((seg_id, mapping, _PAGE))
        return self._own[-1]

    def _offer(self, seg_id, fd):
        """Hand a new segment of ours to the connected peer, before any frame names it."""
        if self._socket is None:
            return  # no worker yet: connect() hands it over
        shared = _read_only(fd) if self.host else fd
        try:
            socket.send_fds(self._socket, [_OFFER.pack(seg_id)], [shared])
        except OSError as exc:
            raise ProtocolError(f"cannot hand segment {seg_id} to the peer: {exc}") from exc
        finally:
            if shared != fd:
                os.close(shared)

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
        return self._add_own_segment(size)

    # -- the peer's segments ------------------------------------------------------------

    def segment_mapping(self, seg_id):
        """The Mapping of segment ``seg_id``, ours or the peer's (mapped now if need be)."""
        own = [m for i, m, _ in self._own if i == seg_id]
        if own:
            return own[0]
        return (self._peer.get(seg_id) or self._map_peer_segment(seg_id))[0]

    def segment_id(self, mapping):
        """Id of one of this side's own segments by its Mapping, or None."""
        return next((i for i, m, _ in self._own if m is mapping), None)

    def owns(self, mapping):
        """Whether ``mapping`` is one of this side's own segments."""
        return self.segment_id(mapping) is not None

    def _map_peer_segment(self, seg_id):
        """(Mapping, ring offset) of a segment the peer names that is not mapped (yet, or
        again: the worker maps a host segment afresh after a model kept or wrote an input)."""
        if _worker_owned(seg_id) != self.host:
            raise ProtocolError(f"peer named segment id {seg_id}, which it does not own")
        if self.host:
            fd = self._take_offered(seg_id)
            try:
                mapping = ope_native.Mapping(fd, _checked_size(fd, seg_id), populate=True)
            finally:
                os.close(fd)
        else:
            if seg_id not in self._peer_fds:
                self._peer_fds[seg_id] = self._take_offered(seg_id)
            fd = self._peer_fds[seg_id]
            mapping = ope_native.Mapping(fd, os.fstat(fd).st_size, populate=True, private=True)
        _check_header(mapping, seg_id)
        self._peer[seg_id] = (mapping, _PAGE)
        return self._peer[seg_id]

    def _take_offered(self, seg_id):
        """The descriptor the peer sent for ``seg_id``; it was sent before the frame that
        names it, so it is already in the socket, maybe behind others."""
        while seg_id not in self._offered:
            if self._socket is None:
                raise ProtocolError(f"peer named segment {seg_id} with no worker connected")
            try:
                data, fds = _receive_offer(self._socket)
            except OSError as exc:
                raise ProtocolError(f"peer named segment {seg_id} but never handed it "
                                    f"over ({type(exc).__name__})") from exc
            if len(data) != _OFFER.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError(f"malformed segment offer from the peer ({len(data)} "
                                    f"bytes, {len(fds)} descriptors)")
            offered_id = _OFFER.unpack(data)[0]
            if offered_id in self._offered or offered_id in self._peer:
                os.close(fds[0])
                raise ProtocolError(f"peer handed segment {offered_id} twice")
            self._offered[offered_id] = fds[0]
        return self._offered.pop(seg_id)

    def _close_offered(self):
        for fd in self._offered.values():
            os.close(fd)
        self._offered.clear()

    # -- tensor frames ------------------------------------------------------------------

    def encode(self, kind, call_id, tensors, in_place=False):
        """The frame (ope/bridge/protocol.py) of a call's ``tensors`` (name -> ndarray), each put in
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
            raise ProtocolError(f"bad tensor frame ({len(data)} bytes) from the peer: {exc}") from exc
        return frame_message(kind, call_id, copied, tensors)

    def keep_kept(self, arrays):
        """Worker side, before answering a call: inputs in ``arrays`` (name -> array) that the
        model still holds get private copies of their pages (ope_native.keep_kept_inputs)."""
        ope_native.keep_kept_inputs(arrays, self._peer)

    def remap(self, arrays):
        """Worker side: map afresh the segments under ``arrays`` (inputs a model wrote into):
        their private copies must not stand in for the host's bytes in later calls."""
        for view in arrays:
            block = block_under(view)
            if block is not None:
                for seg_id, (mapping, _) in list(self._peer.items()):
                    if mapping is block.mapping:
                        del self._peer[seg_id]

    def numpy_hook(self, threshold=64 * 1024):
        """Worker side: numpy's memory handler that cuts arrays of ``threshold`` bytes or more
        from our rings, where they have room, while a model runs (ope_native.memhook_new;
        serve_calls installs it), or None when this numpy has no handler API (< 1.22):
        outputs are copied."""
        return ope_native.memhook_new(self._own, threshold)

    def retire_empty(self, keep_bytes, quiet_s):
        """Give up our segments whose ring has held no block and made no allocation for
        ``quiet_s`` seconds (seen by earlier calls), newest (largest) first, while we own more
        than ``keep_bytes``; the host always keeps its first segment. Call it where nothing
        allocates from our rings meanwhile. Returns the bytes given up."""
        now, retired = time.monotonic(), 0
        for entry in reversed(list(self._own)):
            seg_id, mapping, offset = entry
            allocs = mapping.load64(offset + _ALLOCS)
            seen, since = self._quiet.get(seg_id, (None, now))
            self._quiet[seg_id] = (allocs, since if seen == allocs else now)
            if (self.own_bytes <= keep_bytes or (self.host and entry is self._own[0])
                    or Ring(mapping, offset).used or seen != allocs or now - since < quiet_s):
                continue
            mapping.store32(_RETIRED, 1)
            self._own.remove(entry)
            self._quiet.pop(seg_id)
            fd = self._own_fds.pop(seg_id, None)
            if fd is not None:
                os.close(fd)
            retired += mapping.size
        return retired

    def forget_retired(self):
        """Drop our mappings of the peer's segments it retired (:meth:`retire_empty`)."""
        for seg_id, (mapping, _) in list(self._peer.items()):
            if mapping.load32(_RETIRED):
                self._peer.pop(seg_id, None)
                fd = self._peer_fds.pop(seg_id, None)
                if fd is not None:
                    os.close(fd)

    @property
    def grown(self):
        """Whether we own segments beyond our first."""
        return len(self._own) > 1

    @property
    def peer_bytes(self):
        """Bytes of the peer's segments this side maps."""
        return sum(m.size for m, _ in list(self._peer.values()))

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

    def descriptors(self):
        """Segment id -> the descriptor this side holds for it: the host's own segments
        (read-write, sealed against shrink and grow) and, in a worker, the host's segments it
        mapped (read-only). For inspection: closing the arena closes them."""
        return {**self._own_fds, **self._peer_fds}

    def close(self):
        """Drop every descriptor and our references; outputs the caller holds stay readable
        (their mappings live on until the last view goes)."""
        self.disconnect()
        for fd in [*self._own_fds.values(), *self._peer_fds.values()]:
            os.close(fd)
        self._own_fds.clear()
        self._peer_fds.clear()
        self._own.clear()
        self.channel = None
        self.encoding = self.decoding = None  # they hold bound methods: no cycle outlives close
