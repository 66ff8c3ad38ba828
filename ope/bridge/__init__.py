"""The shared-memory bridge between a host and its worker: data rings of tensor blocks
(ring.py), the two control queues (channel.py), the arena of segments that holds both
(arena.py), and the messages and tensor frames they carry (protocol.py).

Nothing here knows about models or processes: both sides use the same code, and everything
read from the other side is checked before it is used.
"""
