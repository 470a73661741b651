"""The Redis key layout: every key actorq writes is named here and nowhere else.

Keys of one job share the hash tag ``{ID}`` so they live on one Redis Cluster
slot and can be touched together by one Lua script or MULTI/EXEC.

=============================  ======  ==============================================
key                            type    holds
=============================  ======  ==============================================
``actorq:job:{ID}``            hash    status, timestamps, attempt, actor, error,
                                       result JSON, the encrypted job payload, sent,
                                       ended_by, usage so far (until it ends)
``actorq:job:{ID}:events``     stream  the job's events, in order
``actorq:job:{ID}:cancel``     string  set when cancellation is asked
``actorq:job:{ID}:lease``      string  token of the attempt that may publish (TTL'd)
``actorq:idem:{KEY}``          string  job id enqueued under an idempotency key
``actorq:jobs``                zset    job ids by enqueue time (recent-jobs listing)
``actorq:running``             zset    running job ids by lease deadline (sweeper)
=============================  ======  ==============================================
"""

from __future__ import annotations

import re

__all__ = [
    "JOBS_INDEX",
    "JOB_ID_PATTERN",
    "PREFIX",
    "RUNNING_INDEX",
    "cancel_key",
    "entry_id_key",
    "events_key",
    "idempotency_key",
    "job_key",
    "lease_key",
    "valid_entry_id",
    "valid_job_id",
]

PREFIX = "actorq"
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JOBS_INDEX = f"{PREFIX}:jobs"
RUNNING_INDEX = f"{PREFIX}:running"


def valid_job_id(job_id: object) -> bool:
    """True when ``job_id`` is safe to embed in a key (no tag or separator injection)."""
    return isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id) is not None


_ENTRY_ID = re.compile(r"^(0|[0-9]{1,20}(-[0-9]{1,20})?)$")
_U64_MAX = 2**64 - 1


def valid_entry_id(entry_id: object) -> bool:
    """True for a stream entry id Redis accepts as an XREAD cursor (``0``, ``ms`` or ``ms-seq``).

    Both parts must fit in 64 bits: Redis rejects a larger one, and on a shared
    multi-stream XREAD that would fail every other reader's call too.
    """
    if not isinstance(entry_id, str) or not _ENTRY_ID.fullmatch(entry_id):
        return False
    return all(int(part) <= _U64_MAX for part in entry_id.split("-"))


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """A valid entry id as ``(ms, seq)``, to compare ids in stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{{{job_id}}}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{{{job_id}}}:events"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:job:{{{job_id}}}:cancel"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}:job:{{{job_id}}}:lease"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}:idem:{key}"
