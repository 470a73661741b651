"""producer.sse: frames, resume after Last-Event-ID, heartbeats while a job is quiet."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from producer import Client, InvalidInput, JobNotFound, JobTimeout, sse
from tests.helpers import scripted

pytestmark = pytest.mark.usefixtures("workers")


def parse(frames: list[str]) -> list[dict[str, str]]:
    """SSE frames as dicts of their fields (comments under ':')."""
    out = []
    for frame in frames:
        assert frame.endswith("\n\n"), frame
        fields: dict[str, str] = {}
        for line in frame[:-2].split("\n"):
            key, _, value = line.partition(": " if not line.startswith(":") else ":")
            fields[key or ":"] = value
        out.append(fields)
    return out


def test_frames_carry_entry_ids_types_and_json_data(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted("one two three"), "go")
    client.wait_result(job_id, timeout=30)
    events = list(client.stream_events(job_id, timeout=5))
    frames = parse(list(sse.stream_sse(client, job_id, timeout=10)))
    assert frames[0] == {"retry": "1000"}
    body = frames[1:]
    assert [f["id"] for f in body] == [e.id for e in events]
    assert [f["event"] for f in body] == [e.type for e in events]
    assert [json.loads(f["data"]) for f in body] == [e.fields for e in events]
    assert "".join(json.loads(f["data"]).get("text", "") for f in body) == "one two three"


def test_resume_after_last_event_id_gives_each_later_event_once(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted("a b c d e f g h", token_delay_ms=20), "go")
    seen = []
    for frame in sse.stream_sse(client, job_id, timeout=30, retry_ms=None):
        seen.append(frame)
        if frame.count("event: token") and len(seen) == 4:
            break  # the browser went away mid-stream
    last = parse(seen)[-1]["id"]
    cursor = sse.resume_cursor(last, "0")
    rest = parse(list(sse.stream_sse(client, job_id, after=cursor, timeout=30, retry_ms=None)))
    ids = [f["id"] for f in parse(seen)] + [f["id"] for f in rest]
    assert ids == [e.id for e in client.stream_events(job_id, timeout=5)]
    assert sse.stream_finished(client, job_id, rest[-1]["id"])
    assert not sse.stream_finished(client, job_id, last)
    assert not sse.stream_finished(client, job_id, "0")


def test_heartbeats_while_the_job_is_quiet(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted("late", first_token_delay_ms=2500), "go")
    frames = list(sse.stream_sse(client, job_id, heartbeat_s=0.4, timeout=30))
    quiet = []  # frames between the start event and the first token
    for frame in frames[frames.index(next(f for f in frames if "event: start" in f)) + 1 :]:
        if "event: token" in frame:
            break
        quiet.append(frame)
    assert quiet.count(sse.heartbeat()) >= 3
    assert frames[-1].startswith("id:") and "event: done" in frames[-1]


def test_async_stream_heartbeats_and_ends_after_done(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted("slow start", first_token_delay_ms=1500), "go")

    async def collect() -> list[str]:
        return [f async for f in sse.astream_sse(client, job_id, heartbeat_s=0.3, timeout=30)]

    frames = asyncio.run(collect())
    assert frames[0] == "retry: 1000\n\n"
    assert frames.count(sse.heartbeat()) >= 2
    body = [f for f in parse(frames) if "id" in f]
    assert [f["id"] for f in body] == [e.id for e in client.stream_events(job_id, timeout=5)]
    assert body[-1]["event"] == "done"


def test_bad_cursors_and_unknown_jobs_are_refused(client: Client) -> None:
    assert sse.resume_cursor(None, None) == "0"
    assert sse.resume_cursor("", "17-1") == "17-1"
    assert sse.resume_cursor("1700000000000-5", "0") == "1700000000000-5"
    too_big = str(2**64)  # Redis refuses it: on a shared XREAD every reader would fail
    for bad in (
        "abc",
        "1-2-3",
        "-1",
        "1 2",
        "x" * 50,
        "1700000000000-",
        too_big,
        f"1-{too_big}",
        "\u0661\u0662",
        "1\u00b2",
    ):
        with pytest.raises(InvalidInput) as err:
            sse.resume_cursor(bad)
        assert err.value.field == "after"
    with pytest.raises(JobNotFound):
        list(sse.stream_sse(client, "no-such-job", timeout=2))
    with pytest.raises(JobNotFound):
        sse.stream_finished(client, "no-such-job", "0")
    with pytest.raises(InvalidInput):
        list(sse.stream_sse(client, "bad id", timeout=2))
    with pytest.raises(InvalidInput):
        list(sse.stream_sse(client, "x", heartbeat_s=0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0, -1, "15", None])
def test_a_bad_heartbeat_is_refused_naming_the_field(client: Client, bad: Any) -> None:
    job_id = client.enqueue_actor_job(scripted("hi"), "go")
    with pytest.raises(InvalidInput) as err:
        list(sse.stream_sse(client, job_id, heartbeat_s=bad))
    assert err.value.field == "heartbeat_s"

    async def main() -> None:
        with pytest.raises(InvalidInput) as err:
            async for _ in sse.astream_sse(client, job_id, heartbeat_s=bad):
                pass
        assert err.value.field == "heartbeat_s"
        with pytest.raises(InvalidInput) as err:
            async for _ in sse.astream_sse(client, job_id, timeout=math.nan):
                pass
        assert err.value.field == "timeout"
        await client.aclose()

    asyncio.run(main())
    with pytest.raises(InvalidInput) as err:
        list(sse.stream_sse(client, job_id, timeout=-1))
    assert err.value.field == "timeout"
    client.wait_result(job_id, timeout=30)  # and the job itself ran as usual
    with pytest.raises(InvalidInput) as err:
        sse.stream_finished(client, job_id, "not-an-id")
    assert err.value.field == "after"


def test_timeout_bounds_the_stream(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted("never soon", first_token_delay_ms=5000), "go")
    with pytest.raises(JobTimeout):
        list(sse.stream_sse(client, job_id, heartbeat_s=0.2, timeout=0.8))
    assert client.wait_result(job_id, timeout=30).status.value == "succeeded"
