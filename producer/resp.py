"""RESP encoding by hand, for the hot paths that pack their own Redis commands.

redis-py's generic packing (encodes and a length per argument, per call) cost
more than the rest of a router's tail or a worker's publish; those paths pack
their constant parts once and join bulk strings made here.
"""

from __future__ import annotations

__all__ = ["bulk"]


def bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string: ``$<len>\\r\\n<value>\\r\\n``."""
    return b"$%d\r\n%b\r\n" % (len(value), value)
