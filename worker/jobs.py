"""Running one job attempt: claim, decode, execute, publish, record.

Everything here runs on the process's shared loop. The claim, every publish
and the final record are fenced by the job's lease, so a duplicate delivery or
a worker that lost its claim writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys, scripts
from producer.crypto import decrypt_credentials
from producer.errors import ActorqError, MessageDecodeError
from producer.schema import SCHEMA_VERSION, ActorResult, JobStatus
from producer.settings import Settings

from .errors import LimitExceeded, ProviderError
from .publisher import JobChannel, Publisher
from .runtime.executor import Executor, RunEvent, create_executor
from .runtime.scrub import scrub
from .supervisor import ActiveJob, Supervisor

__all__ = ["JobRunner", "Outcome"]

log = logging.getLogger("actorq.jobs")


class Outcome(str):
    """What a delivery did: a terminal status, or why it ran nothing."""


def _event_fields(event: RunEvent) -> list[str]:
    if event.type == "token":
        return ["type", "token", "text", event.text, "node", event.node]
    fields = ["type", event.type, "node", event.node]
    for k, v in event.data.items():
        fields += [k, v]
    return fields


class JobRunner:
    """Per-process state shared by all jobs: Redis pool, publisher, supervisor."""

    def __init__(self, settings: Settings, requeue: Callable[[str], None]) -> None:
        self.settings = settings
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=int(os.environ.get("ACTORQ_REDIS_CONNECTIONS", "8")),
            timeout=None,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
            **settings.redis_options,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.publisher = Publisher(self.redis, settings)
        self.supervisor = Supervisor(self.redis, settings, requeue)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.provider_retries = int(os.environ.get("ACTORQ_PROVIDER_RETRIES", "3"))
        self.stall_timeout_ms = int(os.environ.get("ACTORQ_STALL_TIMEOUT_MS", "120000"))

    # -- the attempt ---------------------------------------------------------------

    async def run(self, job_id: str, decode_error: str | None = None) -> Outcome:
        """Run one attempt; with ``decode_error`` the claimed job ends failed with it."""
        s = self.settings
        owner = f"{self.worker_name}:{uuid.uuid4().hex[:12]}"
        now = f"{time.time():.6f}"
        claim = await self.redis.eval(
            scripts.CLAIM,
            4,
            *scripts.job_keys(job_id),
            owner,
            s.lease_ttl_s * 1000,
            now,
            s.max_attempts,
            self.worker_name,
            s.retention_s,
            s.stream_max_events + 64,
            ActorResult(finish_reason="cancelled").to_json(),
            ActorResult(finish_reason="error").to_json(),
        )
        verdict = claim[0].decode()
        if verdict != "claimed":
            log.info("job %s: not run (%s)", job_id, verdict)
            return Outcome(verdict)
        attempt = int(claim[1])
        task = asyncio.current_task()
        assert task is not None
        active = ActiveJob(job_id, owner, task)
        channel = self.publisher.open(job_id, owner)
        await self.supervisor.add(active)
        executor: Executor | None = None
        secrets: list[str] = []
        try:
            try:
                if decode_error is not None:
                    raise MessageDecodeError(decode_error)
                executor, message, secrets = await self._load(job_id)
                status, error, error_type = await self._execute(executor, message, channel, attempt)
            except asyncio.CancelledError:
                if not (active.cancel_requested or active.lease_lost):
                    raise  # the worker itself is going down: leave the job to the sweeper
                status, error, error_type = JobStatus.CANCELLED, "cancelled by request", "Cancelled"
            except (ActorqError, ValueError) as exc:
                status, error, error_type = JobStatus.FAILED, str(exc), type(exc).__name__
            result = (
                executor.last_result
                if executor and executor.last_result
                else ActorResult(
                    finish_reason="error" if status == JobStatus.FAILED else status.value
                )
            )
            if channel.capped:
                status, error, error_type = (
                    JobStatus.LIMIT_EXCEEDED,
                    f"stream_max_events exceeded: the stream holds {s.stream_max_events} events",
                    "LimitExceeded",
                )
            if active.lease_lost or channel.lost:
                log.warning("job %s attempt %d: lost its lease; writing nothing", job_id, attempt)
                return Outcome("fenced")
            active.finishing = True
            return await self._finish(job_id, owner, status, error, error_type, result, secrets)
        finally:
            await self.supervisor.remove(active)

    async def _load(self, job_id: str) -> tuple[Executor, str, list[str]]:
        raw = await self.redis.hget(keys.job_key(job_id), "payload")
        if raw is None:
            raise MessageDecodeError("job payload is missing (expired, or Redis lost it)")
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise MessageDecodeError(f"job payload is not valid JSON ({exc})") from None
        version = payload.get("v")
        if version != SCHEMA_VERSION:
            raise MessageDecodeError(
                f"job payload schema version {version!r} is not supported (want {SCHEMA_VERSION})"
            )
        token = payload.get("credentials")
        creds = decrypt_credentials(token, self.settings.secret_keys) if token else {}
        secrets = [v for f in creds.values() for k, v in f.items() if k != "base_url"]
        message = payload.get("message")
        if not isinstance(message, str):
            raise MessageDecodeError("job payload: message must be a string")
        executor = create_executor(
            payload.get("config"),  # type: ignore[arg-type]
            creds,
            payload.get("limits"),
            payload.get("pricing"),
            stall_timeout_ms=self.stall_timeout_ms,
        )
        return executor, message, secrets

    async def _execute(
        self, executor: Executor, message: str, channel: JobChannel, attempt: int
    ) -> tuple[JobStatus, str | None, str | None]:
        tries = 0
        while True:
            published_before = channel.published + len(channel.pending)
            try:
                async for event in executor.events(message):
                    self.publisher.publish(channel, _event_fields(event))
                    if channel.stopped:
                        break
                await self.publisher.drain(channel)
                return JobStatus.SUCCEEDED, None, None
            except LimitExceeded as exc:
                await self.publisher.drain(channel)
                status = JobStatus.TIMED_OUT if exc.timed_out else JobStatus.LIMIT_EXCEEDED
                return status, str(exc), type(exc).__name__
            except ProviderError as exc:
                if not exc.retryable or tries >= self.provider_retries:
                    await self.publisher.drain(channel)
                    return JobStatus.FAILED, str(exc), type(exc).__name__
                tries += 1
                delay = min(8.0, 0.25 * 2**tries) * (0.5 + random.random())
                log.warning(
                    "job %s: retryable provider error, retry %d in %.2fs: %s",
                    channel.job_id,
                    tries,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                if channel.published + len(channel.pending) > published_before:
                    self.publisher.publish(
                        channel,
                        [
                            "type",
                            "reset",
                            "attempt",
                            str(attempt),
                            "retry",
                            str(tries),
                            "reason",
                            f"provider error, retrying: {exc}"[:500],
                        ],
                    )

    async def _finish(
        self,
        job_id: str,
        owner: str,
        status: JobStatus,
        error: str | None,
        error_type: str | None,
        result: ActorResult,
        secrets: list[str],
    ) -> Outcome:
        s = self.settings
        err = scrub(error or "", secrets)[:2000]
        if result.error:
            result = result.model_copy(update={"error": scrub(result.error, secrets)[:2000]})
        for delay in (0.1, 0.5, 1, 2, 4, 8):
            try:
                done = await self.redis.eval(
                    scripts.FINISH,
                    4,
                    *scripts.job_keys(job_id),
                    owner,
                    status.value,
                    err,
                    error_type or "",
                    result.to_json(),
                    f"{time.time():.6f}",
                    s.retention_s,
                    s.stream_max_events + 64,
                )
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("job %s: could not write the ending (%s); retrying", job_id, exc)
                await asyncio.sleep(delay)
        else:
            log.error("job %s: Redis unreachable; the sweeper will requeue it", job_id)
            return Outcome("unrecorded")
        if int(done[0]) != 1:
            log.warning("job %s: ending not written (%s)", job_id, done[1].decode())
            return Outcome(done[1].decode())
        log.info("job %s: %s", job_id, status.value)
        return Outcome(status.value)
