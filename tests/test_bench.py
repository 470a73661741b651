"""``actorq bench --quick`` end to end: every phase runs and every figure is reported.

No timing assertions: speed figures are for the benchmark to print, not for the
suite to judge on a shared machine.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from ops.bench import BenchOptions, bracket_floor, median_round, memory_tokens, run_bench
from ops.bench_measure import JobTrace, all_streaming, cpu_wait, sched_ns
from ops.bench_peers import arrival_offsets
from ops.bench_report import capacity
from ops.cli import main
from ops.stack import STREAM_NODE_MAX_ENTRIES

FIGURES = {
    "floor": ["cpu_us_per_token", "rate_fraction", "tokens"],
    "load": ["rate_fraction", "cpu_us_per_token", "worker_pss_bytes", "worker_redis_connections",
             "router_tail_connections", "redis_connected_clients", "peak_concurrent",
             "router_cpu_us_per_token", "redis_cpu_us_per_token"],
    "fanin": ["router_tail_connections", "peak_concurrent"],
    "naive": ["cpu_us_per_token", "rate_fraction"],
    "prefork": ["cpu_us_per_token", "worker_pss_bytes", "peak_concurrent"],
}  # fmt: skip


def _number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    lines: list[str] = []
    opts = BenchOptions.quick(out_dir=tmp_path, rounds=2)
    results = run_bench(opts, out=lines.append)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["targets"] == json.loads(json.dumps(results["targets"]))
    for phase, names in FIGURES.items():
        for name in names:
            assert _number(data[phase][name]), (phase, name, data[phase].get(name))
    for phase in ("load", "fanin", "naive", "prefork"):
        part = data[phase]
        assert part["succeeded"] == part["jobs"] > 0, (phase, part["errors"])
        assert part["tokens"] > 0
        for q in ("p50", "p99", "p99_9"):
            assert _number(part["lag_ms"][q]), (phase, q)
        assert "lags_ms" not in part  # raw samples go to the plot, not the JSON
    assert data["load"]["tokens"] == opts.jobs * opts.tokens
    runs = data["floor"]["cpu_us_per_token_runs"]  # measured before and after the load
    assert len(runs) == 2 and all(_number(x) for x in runs)
    assert data["floor"]["cpu_us_per_token"] == pytest.approx(sum(runs) / 2)
    rounds = data["load"]["rounds"]  # floor, load, floor, load, floor
    assert len(rounds) == 2 and data["load"]["reported_round"] in (1, 2)
    reported = rounds[data["load"]["reported_round"] - 1]
    assert reported["worker_cpu_us_per_token"] == data["load"]["cpu_us_per_token"]
    assert reported["floor_cpu_us_per_token"] == data["floor"]["cpu_us_per_token"]
    assert sum(x["tokens"] for x in data["load"]["timeline"]) == data["load"]["tokens"]
    assert data["fanin"]["jobs"] == opts.tail_jobs
    assert 1 <= data["fanin"]["router_tail_connections"] <= 4
    for phase in ("load", "fanin"):  # Redis's time by command: the scripts write, tails read
        by_command = data[phase]["redis_command_us_per_token"]
        assert by_command["evalsha"] > 0 and by_command["xread"] > 0, by_command
    assert any("Redis time by command" in line for line in lines)
    # The embedded Redis runs with actorq's stream node size, and the report says so.
    assert data["machine"]["stream_node_max_entries"] == STREAM_NODE_MAX_ENTRIES
    assert any(f"stream-node-max-entries {STREAM_NODE_MAX_ENTRIES}" in line for line in lines)
    idle = data["idle"]
    for name in ("added_ms_p50", "added_ms_p99"):
        assert _number(idle["first_token"][name]), name
    assert _number(idle["worker_cpu_ms_per_job"]) and _number(idle["redis_cpu_ms_per_job"])
    assert any(f"{opts.cost_jobs} one-token jobs" in line for line in lines)
    assert any("Redis CPU per one-token job" in line for line in lines)
    mem = idle["memory"]
    assert mem["succeeded"] == mem["jobs"]
    assert mem["entries_per_job"] == memory_tokens(opts) + 2  # start, tokens, done
    for name in ("bytes_per_entry", "fixed_bytes_per_job", "record_bytes_per_job"):
        assert _number(mem[name]) and mem[name] > 0, name
    # Redis allocates stream nodes in steps: few entries may cost no extra bytes.
    assert _number(mem["marginal_bytes_per_entry"]) and mem["marginal_bytes_per_entry"] >= 0
    # One verdict row per figure the issue sets a target for, targets 1 to 6.
    assert sorted({row["target"] for row in data["targets"]}) == ["1", "2", "3", "4", "5", "6"]
    assert all(_number(row["value"]) and row["ok"] in (True, False) for row in data["targets"])
    cap = data["capacity"]
    assert cap == capacity(data)
    assert all(_number(v) and v > 0 for v in cap.values()), cap
    assert cap["load_nominal_tokens_per_s"] == opts.jobs * 1000 / opts.delay_ms
    assert (tmp_path / "bench-lag.png").stat().st_size > 1000
    text = "\n".join(lines)
    for label in (
        "floor (a)",
        "naive (b)",
        "prefork (c)",
        "token rate / nominal",
        "MiB",
        "Capacity at the nominal rates",
        "CPU vs floor by round",
        "(round 2 of 2)",
    ):
        assert label in text
    if Path("/proc/self/task").is_dir() and sched_ns([os.getpid()]):
        for phase in ("load", "fanin"):  # each process's run-queue time, from the kernel
            for part, wait in data[phase]["cpu_wait"].items():
                shares = [wait["busiest_running"], wait["busiest_waiting"], wait["waiting"]]
                assert all(_number(x) and x >= 0 for x in shares), (phase, part, wait)
                assert 0 < wait["busiest_running"] <= 1.05, (phase, part, wait)
        assert "Runnable but waiting for a CPU" in text
        # The worker's CPU by thread adds up to what /proc counts for the process
        # (clock ticks against the scheduler's nanoseconds: within a few ticks).
        load = data["load"]
        split = load["worker_cpu_us_per_token_by_thread"]
        assert set(split) == {"loop", "main", "other"}
        assert split["loop"] > 0 and split["main"] > 0 and split["other"] >= 0, split
        ticks_us = 5 * 1e6 / os.sysconf("SC_CLK_TCK") / load["tokens"]
        assert sum(split.values()) == pytest.approx(load["cpu_us_per_token"], abs=ticks_us)
        assert "Worker CPU per token by thread, in the load: event loop" in text


def test_the_floor_is_the_mean_of_its_two_runs() -> None:
    before = {"jobs": 3, "tokens": 60, "cpu_us_per_token": 40.0, "rate_fraction": 0.9}
    after = {"jobs": 3, "tokens": 60, "cpu_us_per_token": 50.0, "rate_fraction": 1.0}
    merged = bracket_floor(before, after)
    assert merged["cpu_us_per_token"] == 45.0 and merged["rate_fraction"] == pytest.approx(0.95)
    assert merged["tokens"] == 60 and merged["cpu_us_per_token_runs"] == [40.0, 50.0]


def test_the_median_round_is_reported_with_the_floor_around_it() -> None:
    floors = [{"cpu_us_per_token": x} for x in (20.0, 22.0, 30.0, 20.0)]
    loads = [{"cpu_us_per_token": x, "round": i} for i, x in enumerate((42.0, 39.0, 30.0))]
    # Ratios against the mean of the floors around each load: 2.0, 1.5, 1.2.
    load, floor = median_round(loads, floors)
    assert load["round"] == 1 and load["reported_round"] == 2
    assert floor["cpu_us_per_token"] == 26.0 and floor["cpu_us_per_token_runs"] == [22.0, 30.0]
    assert [r["cpu_vs_floor"] for r in load["rounds"]] == pytest.approx([2.0, 1.5, 1.2])
    # Two rounds: the lower of the two.
    load, _ = median_round(loads[:2], floors[:3])
    assert load["reported_round"] == 2
    with pytest.raises(ValueError, match="around each load"):
        median_round(loads, floors[:3])


def test_cpu_wait_is_the_busiest_threads_share_of_the_wall_time() -> None:
    before = {1: (1_000, 500), 2: (4_000, 0)}
    after = {1: (2_000, 1_500), 2: (504_000, 250_000), 3: (10_000, 30_000)}  # 3 started between
    wait = cpu_wait(before, after, 1e-3)  # a millisecond
    assert wait == {"busiest_running": 0.5, "busiest_waiting": 0.25, "waiting": 0.281}
    assert cpu_wait(before, {}, 1.0) is None  # no schedstat: nothing to say
    assert cpu_wait(before, after, 0.0) is None


def test_capacity_is_cores_at_the_nominal_rates() -> None:
    res = {
        "options": {"jobs": 300, "delay_ms": 20.0, "tail_jobs": 1000, "tail_delay_ms": 100.0},
        "floor": {"cpu_us_per_token": 50.0},
        "load": {"cpu_us_per_token": 60.0, "router_cpu_us_per_token": 30.0,
                 "redis_cpu_us_per_token": 20.0},
        "fanin": {"cpu_us_per_token": 80.0, "router_cpu_us_per_token": 40.0,
                  "redis_cpu_us_per_token": None},
    }  # fmt: skip
    cap = capacity(res)
    assert (
        cap["load_nominal_tokens_per_s"] == 15_000 and cap["fanin_nominal_tokens_per_s"] == 10_000
    )
    assert cap["floor_cores_at_load_rate"] == pytest.approx(0.75)  # 50 us x 15,000/s
    assert cap["worker_ceiling_vs_floor"] == pytest.approx(1 / 0.75)
    assert cap["worker_cores_at_load_rate"] == pytest.approx(0.9)
    assert cap["load_machine_cores"] == pytest.approx(1.65)  # (60 + 30 + 20) x 15,000/s
    assert cap["fanin_machine_cores"] is None  # a part not measured: no total
    assert cap["redis_core_tokens_per_s_load"] == pytest.approx(50_000)  # 1 s / 20 us
    assert cap["redis_core_tokens_per_s_fanin"] is None
    res["options"]["delay_ms"] = 0  # no nominal rate: nothing to divide by
    assert capacity(res)["floor_cores_at_load_rate"] is None


def test_bench_command_rejects_bad_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--jobs", "many"])
    assert "--jobs" in capsys.readouterr().err
    assert main(["bench", "--quick", "--jobs", "0"]) == 2
    assert "jobs must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "--quick", "--rounds", "0"]) == 2
    assert "rounds must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "--quick", "--cost-jobs", "0"]) == 2
    assert "cost_jobs must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "--delay-ms", "-5"]) == 2
    assert "delay_ms" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tail_jobs"):
        BenchOptions(tail_jobs=0)
    assert main(["bench", "--ramp-s", "-1"]) == 2
    assert "ramp_s must be between 0 and 600" in capsys.readouterr().err


def test_the_floor_and_the_load_share_one_random_arrival_schedule() -> None:
    offsets = arrival_offsets(300, 1.0)
    assert offsets == arrival_offsets(300, 1.0)  # seeded: both processes compute the same
    assert offsets == sorted(offsets) and offsets[0] >= 0 and offsets[-1] < 1.0
    # Not in phase: the starts spread over the 20 ms between tokens, not a few slots.
    phases = {int(x * 1000) % 20 for x in offsets}
    assert len(phases) == 20
    assert arrival_offsets(5, 0) == [0.0] * 5


def test_all_streaming_window_is_where_every_job_overlaps() -> None:
    def trace(times: list[float], lags: list[float]) -> JobTrace:
        return JobTrace("j", received=times, lags_ms=lags)

    # Job a streams 0..10 s, job b 4..20 s: both stream from 4 to 10.
    a = trace([0, 2, 4, 6, 8, 10], [90, 90, 1, 2, 3, 4])
    b = trace([4, 12, 20], [5, 90, 90])
    window = all_streaming([a, b])
    assert window is not None
    assert window["seconds"] == 6 and window["tokens"] == 5  # a's 4..10 and b's first
    assert window["lag_ms"]["p99"] == 5  # the ramp's and drain's 90s are outside
    assert all_streaming([trace([0, 1], [1, 1]), trace([2, 3], [1, 1])]) is None  # no overlap
    assert all_streaming([a, trace([], [])]) is None  # a job that never streamed


def test_the_in_process_comparison_runs_and_prints_its_figures() -> None:
    import subprocess
    import sys

    # Its own process: it leaves a loop thread with live timers behind, as a worker would.
    args = ["--jobs", "4", "--tokens", "5", "--delay-ms", "5", "--ttft-ms", "5", "--ramp-s", "0.05"]
    cmd = [sys.executable, "-m", "ops.bench_inprocess", *args]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [*cmd, "--rounds", "2"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["round 1", "round 2", "median"]
    assert "x (4 jobs x 5 tokens" in lines[-1]
    assert all("floor + publishing" in line for line in lines)  # every token written, or it fails
    for line in lines[:-1]:  # the publisher's round trips, read from its metric, in both
        published, ran = line.split("pipelines ")[1].split(" / ")
        assert int(published) > 0 and int(ran) > 0, line
    assert "tokens a pipeline" in lines[-1]
    bad = subprocess.run(
        [*cmd, "--rounds", "0"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--rounds" in bad.stderr
