"""Running one job attempt: claim, decode, execute, publish, record.

Everything here runs on the process's shared loop. The claim, every publish
and the final record are fenced by the job's lease, so a duplicate delivery or
a worker that lost its claim writes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import socket
import time
import uuid

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import scripts
from producer.errors import ActorqError, MessageDecodeError
from producer.resp import transient_reply
from producer.schema import ActorResult, JobStatus
from producer.settings import Settings, env_number

from . import logctx, metrics
from .errors import LimitExceeded, ProviderError
from .message import decode_payload
from .publisher import JobChannel, Publisher
from .runtime.budget import combine_tries, remaining_limits
from .runtime.executor import Executor, RunEvent, create_executor
from .runtime.scrub import scrub
from .supervisor import ActiveJob, Requeue, Supervisor

__all__ = ["JobRunner", "Outcome"]

log = logging.getLogger("actorq.jobs")


class Outcome(str):
    """What a delivery did: a terminal status, or why it ran nothing."""


def _event_fields(event: RunEvent) -> list[str]:
    """The stream fields of an event other than a token (those go by ``publish_token``)."""
    fields = ["type", event.type, "node", event.node]
    for k, v in event.data.items():
        fields += [k, v]
    return fields


#: CLAIM's verdicts that mean it wrote the job's ending itself, and that ending's status.
_CLAIM_ENDINGS = {
    "cancelled": JobStatus.CANCELLED.value,
    "exhausted": JobStatus.FAILED.value,
    "unstreamable": JobStatus.FAILED.value,  # its events key is not a stream
}


#: The finish reason of a result no execution set (the job ended before running),
#: as an execution names it.
_UNRUN_REASONS = {
    JobStatus.FAILED: "error",
    JobStatus.TIMED_OUT: "timeout",
    JobStatus.LIMIT_EXCEEDED: "limit",
}

#: A usage snapshot is a result with no text and finish reason ``error``: CLAIM and
#: CANCEL record it as it is, or as ``cancelled``, for a job that ends without running again.
_SNAPSHOT = {"text": "", "finish_reason": "error", "error": None, "time_to_first_token_ms": None}


def _limit_ending(exc: LimitExceeded) -> tuple[JobStatus, str, str]:
    """A job's status, error and error type when ``exc`` stopped it."""
    status = JobStatus.TIMED_OUT if exc.timed_out else JobStatus.LIMIT_EXCEEDED
    return status, str(exc), type(exc).__name__


def _carried_usage(job_id: str, raw: bytes | None) -> ActorResult | None:
    """What the job's lost attempts used, as CLAIM returned it; None if nothing (or unreadable)."""
    if not raw:
        return None
    try:
        return ActorResult.model_validate_json(raw)
    except ValueError as exc:  # not ours to fail the job over: the usage is a record, not input
        log.warning("job %s: lost attempts' usage unreadable, not counted (%s)", job_id, exc)
        return None


class JobRunner:
    """Per-process state shared by all jobs: Redis pool, publisher, supervisor."""

    def __init__(self, settings: Settings, requeue: Requeue) -> None:
        self.settings = settings
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=env_number("ACTORQ_REDIS_CONNECTIONS", 8, int, low=1),
            timeout=None,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
            # A Redis that vanishes without closing the socket must not hang a job.
            socket_timeout=10,
            socket_connect_timeout=5,  # TCP keepalive is redis-py's default (a Unix socket has none)
            **settings.redis_options,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        # The records CLAIM writes for a job it ends itself: constant, so built once.
        self._claim_endings = (
            ActorResult(finish_reason="cancelled").to_json(),
            ActorResult(finish_reason="error").to_json(),
        )
        self.publisher = Publisher(self.redis, settings)
        self.supervisor = Supervisor(
            self.redis, settings, requeue, run_script=self.publisher.run_script
        )
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.provider_retries = env_number("ACTORQ_PROVIDER_RETRIES", 3, int, low=0, high=100)
        self.stall_timeout_ms = env_number("ACTORQ_STALL_TIMEOUT_MS", 120_000, int, low=1)
        # How long an attempt waits for Redis to take its last entries before it gives
        # the job up to the sweeper (by then its lease has lapsed anyway).
        self.drain_timeout_s = max(30.0, 2.0 * settings.lease_ttl_s)
        # How long a delivery waits for an unreachable Redis before it re-sends the job.
        self.claim_wait_s = 30.0

    async def aclose(self) -> None:
        """Stop the supervisor and close the Redis connections (for a loop that ends).

        The worker's own loop lives as long as its process and never calls this.
        """
        await self.supervisor.stop()
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    # -- the attempt ---------------------------------------------------------------

    async def run(self, job_id: str, decode_error: str | None = None) -> Outcome:
        """Run one attempt; with ``decode_error`` the claimed job ends failed with it."""
        s = self.settings
        owner = f"{self.worker_name}:{uuid.uuid4().hex[:12]}"
        claim = await self._claim(job_id, owner)
        if claim is None:
            return Outcome("deferred")
        verdict = claim[0].decode()
        if verdict != "claimed":
            log.info("job %s: not run (%s)", job_id, verdict)
            metrics.job_skipped(verdict)
            if verdict in _CLAIM_ENDINGS:
                metrics.job_ended_at_claim(_CLAIM_ENDINGS[verdict])
            return Outcome(verdict)
        attempt = int(claim[1])
        logctx.bind(job_id=job_id, attempt=attempt)
        carried = _carried_usage(job_id, claim[3])
        task = asyncio.current_task()
        assert task is not None
        active = ActiveJob(job_id, owner, task)
        channel = self.publisher.open(job_id, owner)
        metrics.job_claimed(attempt)
        executor: Executor | None = None
        secrets: list[str] = []
        try:
            try:
                self.supervisor.add(active)
                if decode_error is not None:
                    raise MessageDecodeError(decode_error)
                executor, message, secrets = self._load(claim[2])
                status, error, error_type = await self._execute(
                    executor, message, channel, attempt, active, carried
                )
            except asyncio.CancelledError:
                if not (active.cancel_requested or active.lease_lost):
                    raise  # the worker itself is going down: leave the job to the sweeper
                # Handled: later awaits (drain, finish) must run. The supervisor may
                # have cancelled more than once (a lost cancellation): clear them all.
                while task.uncancel() > 0:
                    pass
                status, error, error_type = JobStatus.CANCELLED, "cancelled by request", "Cancelled"
            except (ActorqError, ValueError) as exc:
                status, error, error_type = JobStatus.FAILED, str(exc), type(exc).__name__
            active.ending = True
            if executor and executor.last_result:
                result = executor.last_result
            else:  # nothing ran: what lost attempts used, if any, is the whole usage
                result = (carried or ActorResult()).model_copy(
                    update={
                        "finish_reason": _UNRUN_REASONS.get(status, status.value),
                        "error": error,
                    }
                )
            # Every entry of this attempt goes out before its ending, so the stream
            # and the record's partial text agree (and nothing follows ``done``).
            try:
                await asyncio.wait_for(self.publisher.drain(channel), self.drain_timeout_s)
            except TimeoutError:
                log.error("job %s: Redis did not take its entries; left to the sweeper", job_id)
                return Outcome("unrecorded")
            if channel.capped:  # known only once the batches came back: after the drain
                error = f"stream_max_events exceeded: the stream holds {s.stream_max_events} events"
                status, error_type = JobStatus.LIMIT_EXCEEDED, "LimitExceeded"
                result = result.model_copy(update={"finish_reason": "limit", "error": error})
            if channel.failed is not None:  # its entries stopped: the text is not whole
                error = f"Redis refused the job's stream entries: {channel.failed}"
                status, error_type = JobStatus.FAILED, "StreamWriteError"
                result = result.model_copy(update={"finish_reason": "error", "error": error})
            if active.lease_lost or channel.lost:
                log.warning("job %s attempt %d: lost its lease; writing nothing", job_id, attempt)
                metrics.job_skipped("fenced")
                await self._give_up(job_id)
                return Outcome("fenced")
            # FINISH takes the job out of the running index unless it was fenced; an
            # attempt that never got that far stays there for the sweeper.
            return await self._finish(job_id, owner, status, error, error_type, result, secrets)
        finally:
            metrics.job_released()
            self.supervisor.remove(active)

    async def _claim(self, job_id: str, owner: str) -> list[bytes] | None:
        """Run CLAIM, waiting out a short Redis outage; None: sent back to the queue.

        A message can arrive while Redis (the job store) is away: with RabbitMQ as
        the broker, or just as Redis went down. Failing the task would ack the
        message and strand the job as ``queued``, so after ``claim_wait_s`` the
        job is sent again instead.
        """
        s = self.settings
        deadline = time.monotonic() + self.claim_wait_s
        delay = 0.2
        while True:
            try:
                # In the publisher's next pipeline: one round trip shared with other jobs.
                claim: list[bytes] = await self.publisher.run_script(
                    scripts.CLAIM,
                    scripts.running_job_keys(job_id),
                    [
                        owner,
                        s.lease_ttl_s * 1000,
                        f"{time.time():.6f}",
                        s.max_attempts,
                        self.worker_name,
                        s.retention_s,
                        s.stream_max_events + 64,
                        *self._claim_endings,
                        s.queue,
                        time.time() + s.lease_ttl_s,
                        job_id,
                    ],
                )
                return claim
            except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not transient_reply(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    log.error(
                        "job %s: Redis unreachable or refusing writes (%s); sending it again",
                        job_id,
                        exc,
                    )
                    try:
                        await asyncio.to_thread(self.supervisor.send_again, job_id, s.queue)
                        return None
                    except Exception as send_exc:  # the broker is away too: keep the message
                        log.error("job %s: could not send it again (%s)", job_id, send_exc)
                        deadline = time.monotonic() + self.claim_wait_s
                log.warning(
                    "job %s: Redis unreachable or refusing writes (%s); claim retry in %.1fs",
                    job_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _give_up(self, job_id: str) -> None:
        """This attempt lost its claim: have the job run again at once if nobody else holds it."""
        try:
            await self.supervisor.requeue(job_id)
        except Exception as exc:  # Redis away: the sweeper finds it later
            log.warning("job %s: could not requeue it (%s); the sweeper will", job_id, exc)

    def _load(self, raw: bytes | None) -> tuple[Executor, str, list[str]]:
        """Decrypt and validate the payload CLAIM returned; build the executor."""
        job = decode_payload(raw, self.settings.secret_keys)
        try:
            executor = create_executor(
                job.config,
                job.credentials,
                job.limits,
                job.pricing,
                stall_timeout_ms=self.stall_timeout_ms,
            )
        except ActorqError:
            raise
        except Exception as exc:  # a payload no validator foresaw: end the job, keep serving
            raise MessageDecodeError(
                f"job payload cannot be run ({type(exc).__name__}: {scrub(str(exc), job.secrets)})"
            ) from None
        return executor, job.message, job.secrets

    async def _execute(
        self,
        executor: Executor,
        message: str,
        channel: JobChannel,
        attempt: int,
        active: ActiveJob,
        carried: ActorResult | None,
    ) -> tuple[JobStatus, str | None, str | None]:
        """Run the actor, retrying retryable provider errors with backoff and jitter.

        A retry whose failed try already published entries first publishes a
        ``reset`` (reason ``retry``), so readers drop that try's text. ``carried``
        (what the job's lost attempts used) is spent like a failed try's: the
        limits are what it left, and the record counts it.
        """
        tries = 0
        base, started = executor.limits, time.monotonic()
        before_ms = carried.duration_ms if carried else 0.0  # the lost attempts' run time
        # Results of the tries that failed, and of the lost attempts: their budget is gone.
        spent: list[ActorResult] = [carried] if carried else []
        publisher = self.publisher
        on_token = functools.partial(publisher.publish_token, channel)

        def elapsed_ms() -> float:
            return before_ms + (time.monotonic() - started) * 1000

        ended: list[ActorResult] = []  # the attempt's whole usage, once its tries are over

        def usage() -> str:
            """What this attempt and the lost ones used so far, for the lease renewal."""
            if ended:  # the ending is being written: what it will record
                return ended[0].model_copy(update=_SNAPSHOT).to_json()
            current = executor.usage_so_far()
            if current is not None and spent and spent[-1] is executor.last_result:
                current = None  # a failed try, waiting for its retry: counted in ``spent``
            used = [r for r in (*spent, current) if r is not None and r.nodes]
            if not used:
                return ""
            total = combine_tries(used[:-1], used[-1], elapsed_ms())
            return total.model_copy(update=_SNAPSHOT).to_json()

        active.usage = usage

        def on_event(event: RunEvent) -> bool:
            return publisher.publish(channel, _event_fields(event))

        if carried:
            try:
                executor.limits = remaining_limits(base, spent, before_ms)
            except LimitExceeded as spent_out:
                return _limit_ending(spent_out)
        try:
            while True:
                queued = channel.queued
                try:
                    await executor.stream_to(message, on_token, on_event)
                    return JobStatus.SUCCEEDED, None, None
                except LimitExceeded as exc:
                    return _limit_ending(exc)
                except ProviderError as exc:
                    if not exc.retryable or tries >= self.provider_retries:
                        if exc.retryable:
                            return (
                                JobStatus.FAILED,
                                f"gave up after {tries + 1} tries: {exc}",
                                type(exc).__name__,
                            )
                        return JobStatus.FAILED, str(exc), type(exc).__name__
                    tries += 1
                    metrics.provider_retry()
                    delay = min(8.0, 0.25 * 2**tries) * (0.5 + random.random())
                    log.warning(
                        "job %s: retryable provider error, retry %d in %.2fs: %s",
                        channel.job_id,
                        tries,
                        delay,
                        exc,
                    )
                    await asyncio.sleep(delay)
                    if executor.last_result is not None:
                        spent.append(executor.last_result)
                    try:
                        executor.limits = remaining_limits(base, spent, elapsed_ms())
                    except LimitExceeded as spent_out:
                        return _limit_ending(spent_out)
                    if channel.queued > queued:  # the failed try published: readers drop it
                        self.publisher.publish(
                            channel,
                            [
                                "type",
                                "reset",
                                "attempt",
                                str(attempt),
                                "reason",
                                "retry",
                                "retry",
                                str(tries),
                                "detail",
                                f"provider error, retrying: {exc}"[:500],
                            ],
                        )
        finally:
            # The record counts every try: the abandoned ones were billed too.
            last = executor.last_result
            prior = spent[:-1] if spent and last is spent[-1] else spent
            if prior and last is not None:
                executor.last_result = combine_tries(prior, last, elapsed_ms())
            if executor.last_result is not None and executor.last_result.nodes:
                ended.append(executor.last_result)

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
        # About 40 s of retries: long enough for a Redis restart or a failover.
        for delay in (0.1, 0.5, 1, 2, 4, 8, 8, 8, 8):
            try:
                done = await self.publisher.run_script(
                    scripts.FINISH,
                    scripts.running_job_keys(job_id),
                    [
                        owner,
                        status.value,
                        err,
                        error_type or "",
                        result.to_json(),
                        f"{time.time():.6f}",
                        s.retention_s,
                        s.stream_max_events + 64,
                        job_id,
                    ],
                )
                break
            except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not transient_reply(exc):
                    raise
                log.warning("job %s: could not write the ending (%s); retrying", job_id, exc)
                await asyncio.sleep(delay)
        else:
            log.error("job %s: Redis unreachable; the sweeper will requeue it", job_id)
            return Outcome("unrecorded")
        if int(done[0]) != 1:
            verdict = done[1].decode()
            log.warning("job %s: ending not written (%s)", job_id, verdict)
            if verdict == "fenced":  # the lease lapsed just before the end
                await self._give_up(job_id)
            return Outcome(verdict)
        log.info("job %s: %s", job_id, status.value)
        metrics.job_ended(status.value, result.time_to_first_token_ms, result.duration_ms)
        return Outcome(status.value)
