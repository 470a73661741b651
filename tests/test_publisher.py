"""The publisher on a real Redis: no entry of one job is lost because of another's."""

from __future__ import annotations

import asyncio
import uuid

from producer import Client, Settings, keys
from tests.conftest import RedisTarget
from tests.helpers import scripted
from worker.jobs import JobRunner


def test_an_unencodable_token_loses_nothing_of_its_own_job_or_its_pipeline_neighbours(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    queue = f"actorq-pub-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue})
    client = Client(settings)
    good, odd = (client.enqueue_actor_job(scripted("x"), "go") for _ in range(2))

    async def main() -> None:
        runner = JobRunner(settings, lambda *a: None)
        for job_id in (good, odd):
            assert await runner._claim(job_id, f"owner-{job_id}") is not None
        pub = runner.publisher
        ch_good, ch_odd = (pub.open(j, f"owner-{j}") for j in (good, odd))
        pub.publish(ch_good, ["type", "token", "text", "A", "node", "n"])
        await pub.drain(ch_good)
        # One pipeline: a normal token beside one a broken model could send (a lone
        # surrogate has no UTF-8 form).
        pub.publish(ch_good, ["type", "token", "text", "B", "node", "n"])
        pub.publish(ch_odd, ["type", "token", "text", "\ud83d!", "node", "n"])
        pub.publish(ch_good, ["type", "token", "text", "C", "node", "n"])
        await asyncio.wait_for(pub.drain(ch_good), 10)
        await asyncio.wait_for(pub.drain(ch_odd), 10)
        await runner.redis.aclose()

    try:
        asyncio.run(main())
        r = redis_target.client()

        def texts(job_id: str) -> list[str]:
            entries = r.xrange(keys.events_key(job_id))
            return [f[b"text"].decode() for _, f in entries if f[b"type"] == b"token"]

        assert texts(good) == ["A", "B", "C"]
        assert texts(odd) == ["?!"]  # replaced, not dropped, and nothing else lost
    finally:
        for job_id in (good, odd):
            client.cancel_job(job_id)
        client.redis.delete(queue)
        client.close()
