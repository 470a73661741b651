"""Every Celery setting of actorq, read from the environment with safe defaults.

Delivery is at least once; the job lease in Redis fences duplicates, so each
setting below errs towards redelivering rather than losing a job.
"""

from __future__ import annotations

import os

from kombu import Queue

from producer.settings import broker_ssl_options


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


_redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"

#: Broker: Redis by default (the same server as the streams); RabbitMQ with
#: ``CELERY_BROKER_URL=amqp://...``. Streams and records always live in REDIS_URL.
broker_url = os.environ.get("CELERY_BROKER_URL") or _redis_url
#: TLS for a ``rediss://`` broker: the same ``ACTORQ_REDIS_SSL_*`` options as the
#: stream store, verifying the server certificate by default.
broker_use_ssl = broker_ssl_options(broker_url, os.environ)
broker_connection_retry_on_startup = True
#: Keep retrying a lost broker rather than exiting: in-flight jobs keep streaming.
broker_connection_max_retries = None

#: No Celery result backend: results live in the job record written by actorq.
result_backend = None
task_ignore_result = True
#: Off, so the stored task metadata never holds args.
result_extended = False

task_serializer = "json"
accept_content = ["json"]
task_default_queue = os.environ.get("ACTORQ_QUEUE") or "actorq"
task_queues = [Queue(task_default_queue)]
task_create_missing_queues = True

#: Ack after the job ran: a job whose worker dies is redelivered, not lost.
task_acks_late = True
#: A worker process killed mid-job puts its message back on the queue.
task_reject_on_worker_lost = True
#: Take one message per free slot, so a dying worker holds few unstarted jobs.
worker_prefetch_multiplier = 1
#: With acks_late, a broker connection loss means the broker will redeliver the
#: running jobs; cancel them here so two attempts don't run (the lease fences too).
worker_cancel_long_running_tasks_on_connection_loss = True

#: Redis broker: an unacked message reappears after this many seconds. It must
#: exceed the longest job (limits.timeout_ms is capped at 24 h); dead workers are
#: found much sooner by the lease sweeper, which requeues their jobs itself.
broker_transport_options = {
    "visibility_timeout": _env_int("ACTORQ_VISIBILITY_TIMEOUT_S", 25 * 3600),
}

#: The threads pool with one shared asyncio loop per process: one process streams
#: hundreds of jobs at once (prefork + asyncio.run would run one per child).
worker_pool = "threads"
worker_concurrency = _env_int("ACTORQ_CONCURRENCY", 200)

#: Task events for Flower; argsrepr / kwargsrepr carry only the job id and actor name.
worker_send_task_events = True
task_send_sent_event = True

worker_hijack_root_logger = False
