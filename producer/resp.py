"""RESP encoding by hand, for the hot paths that pack their own Redis commands.

redis-py's generic packing (encodes and a length per argument, per call) cost
more than the rest of a router's tail or a worker's publish; those paths pack
their constant parts once and join bulk strings made here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["bulk", "evalsha", "script_sha", "transient_reply", "wrong_node_reply"]

#: Codes of error replies from a Redis that can't take a write just now (a failover,
#: loading its data, memory full, a script running long, a failed snapshot with
#: stop-writes-on-bgsave-error, too few replicas for min-replicas-to-write): worth retrying.
_TRANSIENT = ("READONLY", "MASTERDOWN", "LOADING", "BUSY", "OOM", "TRYAGAIN", "CLUSTERDOWN",
              "MISCONF", "NOREPLICAS")  # fmt: skip
#: ...of which these say the connection reached a node that is no longer the primary.
_WRONG_NODE = ("READONLY", "MASTERDOWN")
#: redis-py's classes for some of those codes (it strips the code from their text).
_CLASSES = {"ReadOnlyError": "READONLY", "BusyLoadingError": "LOADING",
            "OutOfMemoryError": "OOM", "TryAgainError": "TRYAGAIN"}  # fmt: skip


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


def _has_code(exc: BaseException, codes: Sequence[str]) -> bool:
    """Whether ``exc`` is an error reply with one of ``codes``, also when a Lua script
    hit it (Redis 6 reports those as ``... @user_script:N: -OOM ...``)."""
    if _CLASSES.get(type(exc).__name__) in codes:
        return True
    text = str(exc)
    return any(text.startswith(code + " ") or f"-{code} " in text for code in codes)


def transient_reply(exc: BaseException) -> bool:
    """An error reply worth retrying: the server can't write now, not "wrong command"."""
    return _has_code(exc, _TRANSIENT)


def wrong_node_reply(exc: BaseException) -> bool:
    """An error reply from a demoted primary: reconnect before retrying."""
    return _has_code(exc, _WRONG_NODE)
