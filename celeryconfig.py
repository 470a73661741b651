"""Every Celery setting of actorq, read from the environment with safe defaults.

Delivery is at least once; the job lease in Redis fences duplicates, so each
setting below errs towards redelivering rather than losing a job.
"""

from __future__ import annotations

import os

from kombu import Queue

from producer import broker
from producer.settings import (
    broker_from_env,
    env_flag,
    env_number,
)
from producer.settings import broker_transport_options as _transport_options_for

#: ``redis://`` brokers use kombu's Redis transport with one client per channel.
broker.install()

#: Broker: Redis by default (the same server as the streams); RabbitMQ with
#: ``CELERY_BROKER_URL=amqp://...``. Streams and records always live in REDIS_URL.
#: A Redis URL is put in the form kombu takes (``kombu_broker_url``); Celery prefers
#: the variable ``CELERY_BROKER_URL`` to ``broker_url``, but not to the read and
#: write URLs.
#: TLS for a ``rediss://`` broker: the same ``ACTORQ_REDIS_SSL_*`` options as the
#: stream store, verifying the server certificate by default.
broker_url, broker_use_ssl = broker_from_env(os.environ)
broker_read_url = broker_write_url = broker_url
#: A worker started before its broker waits for it instead of exiting.
broker_connection_retry_on_startup = True
#: Keep retrying a lost broker rather than exiting: in-flight jobs keep streaming.
broker_connection_max_retries = None

#: No Celery result backend: results live in the job record written by actorq.
result_backend = None
task_ignore_result = True
#: Off, so the stored task metadata never holds args.
result_extended = False

#: JSON only: a message is data (job id, actor name), never code (no pickle).
task_serializer = "json"
accept_content = ["json"]
#: The queue producers send to and workers consume (``ACTORQ_QUEUE``); the sweeper
#: sends a lost job back to the queue recorded when it was claimed.
task_default_queue = os.environ.get("ACTORQ_QUEUE") or "actorq"
task_queues = [Queue(task_default_queue)]
task_create_missing_queues = True

# -- delivery: at least once, fenced by the job lease --------------------------------
# A message is acked only after the job ended, so a job whose worker dies is sent
# again rather than lost. Duplicates are harmless: the CLAIM script lets one
# attempt hold a job's lease; a copy that arrives while it runs, or after it
# ended, runs nothing and writes nothing.

#: Ack after the job ran (not on receipt): a job whose worker dies is redelivered, not lost.
task_acks_late = True
#: A worker process killed mid-job puts its message back on the queue instead of
#: acking it as failed (prefork; on the threads pool the whole worker is the process,
#: and the broker gives the message back when its connection drops: RabbitMQ at
#: once, Redis after ``visibility_timeout``).
task_reject_on_worker_lost = True
#: Reserve one message per free pool slot, so a dying worker holds no unstarted jobs
#: beyond the ones it was about to run.
worker_prefetch_multiplier = 1
#: With acks_late, a broker connection loss means the broker will redeliver the
#: running jobs; this asks Celery to cancel them so two attempts don't run. The
#: threads pool cannot stop a running thread, so actorq's consumer (below) settles
#: them instead: the job keeps streaming and its lease fences the redelivered copy.
#: Set (rather than left to the default) so the choice is explicit on every Celery.
worker_cancel_long_running_tasks_on_connection_loss = True
#: Celery's consumer, with a reconnect that does not crash the worker when jobs are
#: running (see worker/consumer.py): a worker survives a broker restart.
worker_consumer = "worker.consumer:Consumer"

#: Visibility timeout, unacked restore and socket options of a Redis broker
#: (none for RabbitMQ): see :func:`producer.settings.broker_transport_options`.
broker_transport_options = _transport_options_for(broker_url, os.environ)

#: The threads pool with one shared asyncio loop per process: one process streams
#: hundreds of jobs at once (prefork + asyncio.run would run one per child).
worker_pool = "threads"
worker_concurrency = env_number("ACTORQ_CONCURRENCY", 200, int)

#: Task events for Flower; argsrepr / kwargsrepr carry only the job id and actor name.
#: ``ACTORQ_TASK_EVENTS=0`` turns them off, in workers and in enqueuers alike: an
#: enqueue then costs ~400 us of CPU instead of ~500 (no ``task-sent`` event), a job
#: 0.05-0.1 ms of a worker's ~1.1 ms less. Flower then lists the workers, no tasks.
worker_send_task_events = env_flag("ACTORQ_TASK_EVENTS", True)
task_send_sent_event = worker_send_task_events

#: Leave the root logger to the application (structured job logs).
worker_hijack_root_logger = False
