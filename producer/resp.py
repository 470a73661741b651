"""RESP encoding by hand, for the hot paths that pack their own Redis commands.

redis-py's generic packing (encodes and a length per argument, per call) cost
more than the rest of a router's tail or a worker's publish; those paths pack
their constant parts once and join bulk strings made here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["bulk", "evalsha", "script_sha"]


def bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string: ``$<len>\\r\\n<value>\\r\\n``."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def script_sha(source: str) -> bytes:
    """The name Redis gives a script (``SCRIPT LOAD``'s reply): its SHA1, in hex."""
    return hashlib.sha1(source.encode()).hexdigest().encode()


def evalsha(sha: bytes, keys: Sequence[bytes], args: Sequence[bytes]) -> bytes:
    """``EVALSHA sha numkeys key.. arg..`` in RESP."""
    words = [*keys, *args]
    return b"".join(
        [
            b"*%d\r\n$7\r\nEVALSHA\r\n" % (len(words) + 3),
            bulk(sha),
            bulk(b"%d" % len(keys)),
            *map(bulk, words),
        ]
    )
