"""The router-side client: enqueue, tail, inspect and cancel jobs.

:class:`Client` holds one Redis connection pool (sync and async) and the
Celery app used to send tasks by name; the module-level functions in
``producer`` use a default client built from the environment.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from . import keys, scripts
from .config import (
    check_budget,
    check_credentials,
    parse_config,
    parse_credentials,
    parse_limits,
    parse_pricing,
)
from .crypto import encrypt_credentials
from .errors import ConfigError, InvalidInput, JobNotFound, JobTimeout
from .schema import (
    SCHEMA_VERSION,
    TASK_NAME,
    ActorResult,
    Event,
    EventType,
    JobRecord,
    JobStatus,
    task_message,
)
from .settings import Settings, broker_transport_options
from .tail import Tail

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CancelOutcome", "Client", "celery_app", "use_broker"]

_IDEM_PATTERN = re.compile(r"^[\x21-\x7e]{1,200}$")
_BLOCK_MS = 2000
#: How long an idempotency key is held by an enqueue still creating and sending its
#: job (longer than any send: the broker's socket timeout is 30 s), how long a caller
#: that finds it held waits for that send, and how often it looks.
_IDEM_PENDING_TTL_S = 300
_IDEM_WAIT_S = 10.0
_IDEM_POLL_S = 0.02
_DONE = EventType.DONE.value  # the type of a stream's last entry


def celery_app(name: str, settings: Settings) -> Celery:
    """A Celery app on ``settings``' broker and queue, with actorq's Celery settings.

    Celery takes ``CELERY_BROKER_URL`` from the process environment over any
    ``broker_url`` it is given; :func:`use_broker` makes ``settings`` decide.
    """
    from celery import Celery

    import celeryconfig

    url = settings.broker_url
    app = Celery(name)
    app.config_from_object(celeryconfig)
    use_broker(app, url)
    app.conf.update(
        broker_use_ssl=settings.broker_ssl,
        broker_transport_options=broker_transport_options(url, os.environ),
        task_default_queue=settings.queue,
    )
    return app


def use_broker(app: Celery, url: str) -> None:
    """Send ``app``'s messages through ``url``, whatever ``CELERY_BROKER_URL`` says.

    Celery reads ``broker_url`` from the environment first; its connections use the
    read and write URLs, which only their own variables override.
    """
    app.conf.update(broker_url=url, broker_read_url=url, broker_write_url=url)


class CancelOutcome(str, Enum):
    """What :meth:`Client.cancel_job` did."""

    CANCELLED = "cancelled"  # it was queued: it ended cancelled and will never start
    REQUESTED = "requested"  # it is running: the worker stops it within a second
    ALREADY_REQUESTED = "already_requested"
    FINISHED = "finished"  # it had already ended: nothing to do


def _cancelled_result() -> str:
    return ActorResult(finish_reason="cancelled").to_json()


class Client:
    """A connection to one actorq deployment (one Redis + one broker)."""

    def __init__(self, settings: Settings | None = None, celery_app: Celery | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._redis: redis.Redis | None = None
        # Keyed by the loop itself, weakly: a router running asyncio.run per request
        # must not keep one client per dead loop (nor reuse one for a recycled id).
        self._aredis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._tails: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Tail] = (
            weakref.WeakKeyDictionary()
        )
        self._celery = celery_app
        self._loops_lock = threading.Lock()
        # One Client may serve a threaded router: its first calls race to build these.
        self._connect_lock = threading.Lock()

    # -- connections -------------------------------------------------------------

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            with self._connect_lock:
                if self._redis is None:
                    self._redis = redis.Redis.from_url(
                        self.settings.redis_url, **self.settings.redis_options
                    )
        return self._redis

    @property
    def aredis(self) -> aioredis.Redis:
        """An asyncio client bound to the running loop (pools can't cross loops)."""
        loop = asyncio.get_running_loop()
        client = self._aredis.get(loop)
        if client is None:
            self._forget_closed_loops()
            client = aioredis.Redis.from_url(self.settings.redis_url, **self.settings.redis_options)
            self._aredis[loop] = client
        return client

    def _forget_closed_loops(self) -> None:
        """Drop the clients of loops that closed without :meth:`aclose`.

        Their connections refer to their loop, so the weak keys alone never let
        go: each ``asyncio.run`` would leave its pools (and sockets) behind. Dropped,
        they are collected and their sockets closed.
        """
        with self._loops_lock:  # one Client may serve threads that each run a loop
            for table in (self._aredis, self._tails):
                for loop in [loop for loop in list(table) if loop.is_closed()]:
                    table.pop(loop, None)

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            # Built once under the lock: threads racing here each built an app (all but
            # one leaking its broker pool), and importing celery from several threads
            # at once raised ImportError in some of them.
            with self._connect_lock:
                if self._celery is None:
                    self._celery = celery_app("actorq-producer", self.settings)
        return self._celery

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._celery is not None:
            self._celery.close()

    # -- enqueue -----------------------------------------------------------------

    def enqueue_actor_job(
        self,
        config: Mapping[str, Any],
        message: str,
        *,
        credentials: Mapping[str, Mapping[str, str]] | None = None,
        limits: Mapping[str, Any] | None = None,
        pricing: Mapping[str, Mapping[str, Any]] | None = None,
        job_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Validate everything, store the job, send it to the queue; return its id at once."""
        payload, actor = self._build_payload(
            config, message, credentials, limits, pricing, job_id, idempotency_key
        )
        new_id: str = payload["job_id"]
        if idempotency_key is None:
            self._create(new_id, payload, actor)
            self._send(new_id, actor, None)
            return new_id
        return self._enqueue_once(keys.idempotency_key(idempotency_key), new_id, payload, actor)

    def _enqueue_once(self, idem: str, job_id: str, payload: dict[str, Any], actor: str) -> str:
        """Enqueue under the idempotency key ``idem``, or return the job it already names.

        The key is taken before the job is created and sent, for
        ``_IDEM_PENDING_TTL_S`` only: an enqueue that fails gives it back at once,
        and one whose process died mid-way lets it lapse, so a retry enqueues
        afresh. Once the message is out, the key lives for the retention. A caller
        that finds the key taken returns that job once it has been sent, and takes
        the key itself if it goes away (its enqueue failed); after ``_IDEM_WAIT_S``
        it returns the id it found, that enqueue still in flight.
        """
        r = self.redis
        deadline = time.monotonic() + _IDEM_WAIT_S
        while True:
            if r.set(idem, job_id, nx=True, ex=_IDEM_PENDING_TTL_S):
                try:
                    self._create(job_id, payload, actor)
                except BaseException:
                    self._release(idem, job_id)
                    raise
                self._send(job_id, actor, idem)
                return job_id
            raw: Any = r.get(idem)
            if raw is None:
                continue  # given back or lapsed since: take it
            other = raw.decode()
            fields: Any = r.hmget(keys.job_key(other), "status", "sent")
            status, sent = fields
            if (status is not None and (sent or status != b"queued")) or (
                time.monotonic() >= deadline
            ):
                return other
            time.sleep(_IDEM_POLL_S)

    def _create(self, job_id: str, payload: dict[str, Any], actor: str) -> None:
        created = self.redis.eval(
            scripts.CREATE,
            4,
            *scripts.job_keys(job_id),
            json.dumps(payload),
            actor,
            f"{time.time():.6f}",
            self.settings.retention_s,
        )
        if not created:
            raise InvalidInput("job_id", f"a job with id {job_id!r} already exists")

    def _send(self, job_id: str, actor: str, idem: str | None) -> None:
        """Send the job's task; if that fails, undo the job (and give ``idem`` back)."""
        s = self.settings
        r = self.redis
        try:
            self.celery.send_task(TASK_NAME, queue=s.queue, **task_message(job_id, actor))
        except Exception:
            r.delete(keys.job_key(job_id))
            if idem is not None:
                self._release(idem, job_id)
            raise
        now = time.time()
        pipe = r.pipeline(transaction=False)
        # Sent: a caller with the same idempotency key may return it from now on,
        # and the key lives as long as the job.
        pipe.hset(keys.job_key(job_id), "sent", 1)
        if idem is not None:
            pipe.expire(idem, s.retention_s)
        pipe.zadd(keys.JOBS_INDEX, {job_id: now})
        pipe.zremrangebyscore(keys.JOBS_INDEX, "-inf", now - s.retention_s)
        pipe.execute()

    def _release(self, idem: str, job_id: str) -> None:
        """Give the idempotency key back if it still names ``job_id``."""
        self.redis.eval(scripts.IDEM_RELEASE, 1, idem, job_id)

    def _build_payload(
        self,
        config: object,
        message: object,
        credentials: object,
        limits: object,
        pricing: object,
        job_id: object,
        idempotency_key: object,
    ) -> tuple[dict[str, Any], str]:
        s = self.settings
        if job_id is None:
            job_id = uuid.uuid4().hex
        elif not keys.valid_job_id(job_id):
            raise InvalidInput("job_id", "must match [A-Za-z0-9_-]{1,64}")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not _IDEM_PATTERN.fullmatch(idempotency_key)
        ):
            raise InvalidInput("idempotency_key", "must be 1-200 printable ASCII characters")
        if not isinstance(config, Mapping):
            raise ConfigError("config", f"must be a mapping, not {type(config).__name__}")
        try:
            config_json = json.dumps(dict(config), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError("config", f"must be JSON-serialisable ({exc})") from None
        except RecursionError:
            raise ConfigError("config", "nested too deeply to serialise") from None
        if len(config_json.encode()) > s.max_config_bytes:
            raise ConfigError("config", f"larger than {s.max_config_bytes} bytes")
        if not isinstance(message, str):
            raise InvalidInput("message", f"must be a str, not {type(message).__name__}")
        if len(message.encode("utf-8", "surrogatepass")) > s.max_message_bytes:
            raise InvalidInput("message", f"larger than {s.max_message_bytes} bytes")
        try:
            message.encode()
        except UnicodeEncodeError:
            raise InvalidInput("message", "must be valid unicode (no lone surrogates)") from None
        parsed = parse_config(json.loads(config_json))
        parsed_limits = parse_limits(limits)
        parsed_pricing = parse_pricing(pricing)
        check_budget(parsed, parsed_limits, parsed_pricing)
        creds = parse_credentials(credentials)
        check_credentials(parsed, creds)
        payload = {
            "v": SCHEMA_VERSION,
            "job_id": job_id,
            "config": json.loads(config_json),
            "message": message,
            "limits": parsed_limits.model_dump(mode="json", exclude_none=True),
            "pricing": {m: p.model_dump(mode="json") for m, p in parsed_pricing.items()},
            "credentials": encrypt_credentials(creds, s.secret_keys) if creds else None,
        }
        return payload, parsed.name

    # -- status and results ---------------------------------------------------------

    def get_status(self, job_id: str) -> JobStatus:
        self._check_id(job_id)
        raw: Any = self.redis.hget(keys.job_key(job_id), "status")
        if raw is None:
            raise JobNotFound(job_id)
        return JobStatus(raw.decode())

    def get_result(self, job_id: str) -> JobRecord | None:
        """The completion record once the job has ended, else ``None``."""
        self._check_id(job_id)
        raw = self.redis.hgetall(keys.job_key(job_id))
        return self._record(job_id, raw)

    async def aget_result(self, job_id: str) -> JobRecord | None:
        self._check_id(job_id)
        raw = await self.aredis.hgetall(keys.job_key(job_id))
        return self._record(job_id, raw)

    @staticmethod
    def _record(job_id: str, raw: dict[Any, Any]) -> JobRecord | None:
        if not raw:
            raise JobNotFound(job_id)
        record = JobRecord.from_hash(job_id, raw)
        return record if record.status.terminal else None

    def wait_result(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job ends; :class:`JobTimeout` after ``timeout`` seconds."""
        check_seconds("timeout", timeout)
        for event in self.stream_events(job_id, after=self._tail_id(job_id), timeout=timeout):
            if event.terminal:
                break
        record = self.get_result(job_id)
        assert record is not None  # the done entry and the record are written together
        return record

    async def await_result(self, job_id: str, timeout: float | None = None) -> JobRecord:
        check_seconds("timeout", timeout)
        after = await asyncio.to_thread(self._tail_id, job_id)
        async for event in self.astream_events(job_id, after=after, timeout=timeout):
            if event.terminal:
                break
        record = await self.aget_result(job_id)
        assert record is not None
        return record

    def _tail_id(self, job_id: str) -> str:
        """Where to start reading so a waiter sees the ending without replaying tokens."""
        self._check_id(job_id)
        # MULTI/EXEC: the ending can't land between the two reads, or the cursor
        # would sit on the done entry itself and the waiter would never see it.
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(keys.job_key(job_id), "done_id")
        pipe.xrevrange(keys.events_key(job_id), count=1)
        done_id, last = pipe.execute()
        if done_id:
            # The done entry is the last; start just before it.
            return _before(done_id.decode())
        return last[0][0].decode() if last else "0"

    # -- events ------------------------------------------------------------------

    def stream_events(
        self, job_id: str, *, after: str = "0", timeout: float | None = None
    ) -> Iterator[Event]:
        """Every event after entry id ``after``, in order, ending after the ``done`` event."""
        self._check_id(job_id)
        check_cursor(after)
        check_seconds("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = keys.events_key(job_id)
        r = self.redis
        if _ended(_job_lookup(r.pipeline(transaction=False), job_id).execute(), after, job_id):
            return
        # Each blocking read ends before the socket timeout would cut it.
        socket_timeout = r.connection_pool.connection_kwargs.get("socket_timeout")
        cursor = after
        while True:
            # Before every read, not only after an empty one: a backlog read slowly too.
            _check_deadline(deadline, time.monotonic(), job_id, timeout)
            block = _block_ms(deadline, socket_timeout)
            reply = r.xread({stream: cursor}, count=1000, block=block)
            if not reply:
                answer = _job_lookup(r.pipeline(transaction=False), job_id).execute()
                if _ended(answer, cursor, job_id):  # a cursor past the stream's end (a resume)
                    return
                continue
            for entry_id, fields in _entries(reply):
                event = Event.from_entry(entry_id, fields)
                cursor = event.id
                yield event
                if event.terminal:
                    return
                if deadline is not None:
                    _check_deadline(deadline, time.monotonic(), job_id, timeout)

    async def astream_events(
        self, job_id: str, *, after: str = "0", timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """Async twin of :meth:`stream_events`.

        Every tail of one event loop shares the client's :class:`~producer.tail.Tail`:
        a few connections, each reading many streams with one ``XREAD``: the
        streams Redis's key tracking says changed, or all of them, blocking.
        """
        self._check_id(job_id)
        check_cursor(after)
        check_seconds("timeout", timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        stream = keys.events_key(job_id)
        tail = self.tail
        if after == "0":
            if not await tail.redis.exists(keys.job_key(job_id), stream):
                raise JobNotFound(job_id)
        else:  # a resumed tail: one past the ending has nothing left to read
            answer = await _job_lookup(tail.redis.pipeline(transaction=False), job_id).execute()
            if _ended(answer, after, job_id):
                return
        async with tail.subscribe(stream, after) as sub:
            while True:
                wait = _BLOCK_MS / 1000
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                sub.check_at = loop.time() + wait
                batch = await sub.get()
                _check_deadline(deadline, loop.time(), job_id, timeout)
                if batch is None:  # nothing for a while: is the job still there, or ended?
                    lookup = _job_lookup(tail.redis.pipeline(transaction=False), job_id)
                    if _ended(await lookup.execute(), sub.cursor, job_id):  # cursor past the end
                        return
                    continue
                for entry_id, flat in batch:
                    fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                    kind = fields.pop("type", "")
                    # Validated construction: pydantic's core checks three str fields
                    # in about half the time model_construct's Python path takes.
                    yield Event(id=entry_id, type=kind, fields=fields)
                    if kind == _DONE:  # Event.terminal, without the property per token
                        return
                    if deadline is not None:
                        _check_deadline(deadline, loop.time(), job_id, timeout)

    @property
    def tail(self) -> Tail:
        """The multiplexed reader of the running loop (created on first use)."""
        loop = asyncio.get_running_loop()
        tail = self._tails.get(loop)
        if tail is None:
            self._forget_closed_loops()
            s = self.settings
            tail = Tail(
                s.redis_url,
                max_connections=s.tail_connections,
                track=s.tail_tracking,
                **s.redis_options,
            )
            self._tails[loop] = tail
        return tail

    async def aclose(self) -> None:
        """Close the running loop's async connections (the tail's and the client's)."""
        loop = asyncio.get_running_loop()
        tail = self._tails.pop(loop, None)
        if tail is not None:
            await tail.aclose()
        client = self._aredis.pop(loop, None)
        if client is not None:
            await client.aclose()

    # -- cancel ------------------------------------------------------------------

    def cancel_job(self, job_id: str) -> CancelOutcome:
        """Ask a job to stop. Harmless when repeated or after the end: the outcome says so."""
        self._check_id(job_id)
        s = self.settings
        outcome: Any = self.redis.eval(
            scripts.CANCEL,
            4,
            *scripts.job_keys(job_id),
            f"{time.time():.6f}",
            s.retention_s,
            s.stream_max_events + 64,  # the same MAXLEN as the worker's ending: never trims
            _cancelled_result(),
        ).decode()
        if outcome == "missing":
            raise JobNotFound(job_id)
        return CancelOutcome(outcome)

    @staticmethod
    def _check_id(job_id: object) -> None:
        if not keys.valid_job_id(job_id):
            raise InvalidInput("job_id", "must match [A-Za-z0-9_-]{1,64}")


def check_cursor(after: object) -> None:
    """``InvalidInput`` (field ``after``) unless ``after`` is a stream entry id."""
    if not keys.valid_entry_id(after):
        raise InvalidInput("after", "must be a stream entry id such as '0' or '1700000000000-0'")


def check_seconds(field: str, value: object, *, positive: bool = False) -> None:
    """``InvalidInput`` naming ``field`` unless ``value`` is None or a finite number of
    seconds, at least 0 (above 0 with ``positive``)."""
    if value is None and not positive:
        return
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        want = "a finite number of seconds above 0" if positive else "None or seconds >= 0"
        raise InvalidInput(field, f"must be {want}, not {value!r}")


def past_done(done_id: bytes | str | None, cursor: str) -> bool:
    """True when a job's ``done_id`` is set and ``cursor`` is at or past it: a tail
    from there would wait for an entry that never comes (nothing follows ``done``)."""
    if not done_id or cursor == "0":
        return False
    done = done_id.decode() if isinstance(done_id, bytes) else done_id
    return keys.entry_id_key(cursor) >= keys.entry_id_key(done)


def _before(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-18446744073709551615" if int(ms) > 0 else "0"


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream XREAD reply: a list of ``[stream, entries]`` pairs
    on RESP2, a map of stream to entries on RESP3 (``REDIS_URL=...?protocol=3``)."""
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0])  # redis-py wraps its entries in a list
    return list(reply[0][1])


def _check_deadline(deadline: float | None, now: float, job_id: str, timeout: float | None) -> None:
    """``JobTimeout`` once ``now`` (on the clock ``deadline`` was set by) reached it."""
    if deadline is not None and now >= deadline:
        raise JobTimeout(f"no end of job {job_id!r} within {timeout}s")


def _job_lookup(pipe: Any, job_id: str) -> Any:
    """``pipe`` (sync or async) asking whether the job exists and its ``done_id``."""
    pipe.exists(keys.job_key(job_id), keys.events_key(job_id))
    pipe.hget(keys.job_key(job_id), "done_id")
    return pipe


def _ended(answer: list[Any], cursor: str, job_id: str) -> bool:
    """From :func:`_job_lookup`'s answer: True when a tail at ``cursor`` has nothing
    left to read (the job ended at or before it); ``JobNotFound`` when it is gone."""
    found, done_id = answer
    if not found:
        raise JobNotFound(job_id)
    return past_done(done_id, cursor)


def _block_ms(deadline: float | None, socket_timeout: float | None = None) -> int:
    block = _BLOCK_MS
    if socket_timeout is not None:
        block = min(block, int(socket_timeout * 500))  # half of it: the reply needs time too
    if deadline is not None:
        block = min(block, int((deadline - time.monotonic()) * 1000))
    return max(1, block)
