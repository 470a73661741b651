"""The verdicts, the table and the plot of ``actorq bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["capacity", "render", "targets", "write_plot"]

GIB = 1024**3


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _per_gib(phase: dict[str, Any]) -> float | None:
    pss = phase.get("worker_pss_bytes")
    return phase["peak_concurrent"] / (pss / GIB) if pss else None


def _row(n: str, what: str, goal: str, value: float | None, ok: bool | None) -> dict[str, Any]:
    return {"target": n, "what": what, "goal": goal, "value": value, "ok": ok}


def _le(v: float | None, limit: float) -> bool | None:
    return None if v is None else v <= limit


def _ge(v: float | None, limit: float) -> bool | None:
    return None if v is None else v >= limit


def _streaming_lag(phase: dict[str, Any], q: str) -> float | None:
    window = phase.get("all_streaming")
    return window["lag_ms"][q] if window else None


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure the issue sets a target for, with its verdict.

    Lag targets are judged while every job of the phase streams at once (the
    stated concurrency); the whole run, ramp and drain included, is in the
    second table.
    """
    load, fanin, idle, floor = res["load"], res["fanin"], res["idle"], res["floor"]
    ft, mem = idle["first_token"], idle["memory"]
    cpu_ratio = _ratio(load["cpu_us_per_token"], floor["cpu_us_per_token"])
    ours, prefork = _per_gib(load), _per_gib(res["prefork"])
    fixed = mem["fixed_bytes_per_job"]
    rows = [
        _row("1", "token rate / nominal", ">= 0.97", load["rate_fraction"],
             _ge(load["rate_fraction"], 0.97)),
        _row("1", "delivery lag p50 (ms), all streaming", "<= 5",
             _streaming_lag(load, "p50"), _le(_streaming_lag(load, "p50"), 5)),
        _row("1", "delivery lag p99 (ms), all streaming", "<= 25",
             _streaming_lag(load, "p99"), _le(_streaming_lag(load, "p99"), 25)),
        _row("2", "worker CPU/token vs floor (a)", "<= 1.5x", cpu_ratio, _le(cpu_ratio, 1.5)),
        _row("3", "added first-token p50 (ms)", "<= 5", ft["added_ms_p50"],
             _le(ft["added_ms_p50"], 5)),
        _row("3", "added first-token p99 (ms)", "<= 15", ft["added_ms_p99"],
             _le(ft["added_ms_p99"], 15)),
        _row("4", f"router connections, {fanin['jobs']} tails", "<= 4",
             fanin["router_tail_connections"], _le(fanin["router_tail_connections"], 4)),
        _row("4", "fan-in lag p99 (ms), all streaming", "<= 25",
             _streaming_lag(fanin, "p99"), _le(_streaming_lag(fanin, "p99"), 25)),
        # Per entry as a job grows; what a stream costs regardless of length is in "fixed".
        _row("5", "Redis bytes per token entry", "<= 64", mem["marginal_bytes_per_entry"],
             _le(mem["marginal_bytes_per_entry"], 64)),
        _row("5", "Redis fixed bytes per job", "<= 8192", fixed, _le(fixed, 8192)),
        _row("6", "streams per GiB vs prefork (c)", ">= 5x", _ratio(ours, prefork),
             _ge(_ratio(ours, prefork), 5)),
    ]  # fmt: skip
    return rows


def capacity(res: dict[str, Any]) -> dict[str, Any]:
    """What the load and the fan-in ask of this machine, in cores.

    A worker process runs Python on one core at a time (the GIL): when the floor
    alone takes most of a core at the load's nominal rate, no worker can stay far
    above it without falling behind, however small its own overhead. The lag
    targets are judged against that, so it is printed beside them.
    """
    o = res["options"]
    load, fanin, floor = res["load"], res["fanin"], res["floor"]
    load_rate = o["jobs"] * 1000 / o["delay_ms"] if o["delay_ms"] else None
    fanin_rate = o["tail_jobs"] * 1000 / o["tail_delay_ms"] if o["tail_delay_ms"] else None

    def cores(us_per_token: float | None, rate: float | None) -> float | None:
        return us_per_token * rate / 1e6 if us_per_token is not None and rate else None

    def machine(phase: dict[str, Any], rate: float | None) -> float | None:
        keys = ("cpu_us_per_token", "router_cpu_us_per_token", "redis_cpu_us_per_token")
        parts = [phase.get(k) for k in keys]
        if any(x is None for x in parts):
            return None
        return cores(sum(float(x) for x in parts if x is not None), rate)

    def per_core(us_per_token: float | None) -> float | None:
        return 1e6 / us_per_token if us_per_token else None

    floor_cores = cores(floor["cpu_us_per_token"], load_rate)
    return {
        "load_nominal_tokens_per_s": load_rate,
        "fanin_nominal_tokens_per_s": fanin_rate,
        # The floor's share of one core at the load's rate, and the most CPU per
        # token (as a multiple of the floor) one process can spend at that rate.
        "floor_cores_at_load_rate": floor_cores,
        "worker_ceiling_vs_floor": 1 / floor_cores if floor_cores else None,
        "worker_cores_at_load_rate": cores(load["cpu_us_per_token"], load_rate),
        # Worker, router and Redis together, against the machine's CPUs.
        "load_machine_cores": machine(load, load_rate),
        "fanin_machine_cores": machine(fanin, fanin_rate),
        # Redis runs commands on one core: the tokens per second one Redis carries
        # for a whole fleet, each written once and tailed once, at these costs.
        "redis_core_tokens_per_s_load": per_core(load.get("redis_cpu_us_per_token")),
        "redis_core_tokens_per_s_fanin": per_core(fanin.get("redis_cpu_us_per_token")),
    }


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def render(res: dict[str, Any]) -> str:
    """The two tables: targets with verdicts, then the peers side by side."""
    verdict = {True: "ok", False: "MISS", None: "n/a"}
    t = _table(
        ["#", "figure", "goal", "measured", ""],
        [[r["target"], r["what"], r["goal"], _f(r["value"]), verdict[r["ok"]]]
         for r in res["targets"]],
    )  # fmt: skip
    floor, load, naive, prefork = res["floor"], res["load"], res["naive"], res["prefork"]
    fan = res["fanin"]
    cols = [("floor (a)", floor), ("actorq", load), ("actorq fan-in", fan),
            ("naive (b)", naive), ("prefork (c)", prefork)]  # fmt: skip

    def get(d: dict[str, Any], *path: str) -> Any:
        for k in path:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def per_gib(d: dict[str, Any]) -> Any:
        return _per_gib(d) if "peak_concurrent" in d else None

    rows = [
        ["jobs x tokens", *[f"{d.get('jobs')} x {d.get('tokens', 0) // max(1, d.get('jobs') or 1)}" for _, d in cols]],
        ["token rate / nominal", *[_f(d.get("rate_fraction"), 3) for _, d in cols]],
        ["lag p50 ms, whole run", *[_f(get(d, "lag_ms", "p50")) for _, d in cols]],
        ["lag p99 ms, whole run", *[_f(get(d, "lag_ms", "p99")) for _, d in cols]],
        ["lag p99.9 ms, whole run", *[_f(get(d, "lag_ms", "p99_9")) for _, d in cols]],
        ["all streaming: seconds", *[_f(get(d, "all_streaming", "seconds"), 1) for _, d in cols]],
        ["all streaming: lag p50 ms", *[_f(get(d, "all_streaming", "lag_ms", "p50")) for _, d in cols]],
        ["all streaming: lag p99 ms", *[_f(get(d, "all_streaming", "lag_ms", "p99")) for _, d in cols]],
        ["all streaming: p99.9 ms", *[_f(get(d, "all_streaming", "lag_ms", "p99_9")) for _, d in cols]],
        ["lag p99, yield to Redis", *[_f(get(d, "to_redis_ms", "p99")) for _, d in cols]],
        ["lag p99, Redis to tailer", *[_f(get(d, "from_redis_ms", "p99")) for _, d in cols]],
        ["worker CPU us / token", *[_f(d.get("cpu_us_per_token"), 1) for _, d in cols]],
        ["CPU vs floor", *[_f(_ratio(d.get("cpu_us_per_token"), floor["cpu_us_per_token"])) for _, d in cols]],
        ["router CPU us / token", *[_f(d.get("router_cpu_us_per_token"), 1) for _, d in cols]],
        ["Redis CPU us / token", *[_f(d.get("redis_cpu_us_per_token"), 1) for _, d in cols]],
        ["peak concurrent streams", *[_f(d.get("peak_concurrent")) for _, d in cols]],
        ["worker PSS MiB", *[_f((d.get("worker_pss_bytes") or 0) / 2**20 or None, 1) for _, d in cols]],
        ["streams / GiB", *[_f(per_gib(d), 0) for _, d in cols]],
        ["worker Redis conns", *[_f(d.get("worker_redis_connections")) for _, d in cols]],
        ["router tail conns", *[_f(d.get("router_tail_connections")) for _, d in cols]],
    ]  # fmt: skip
    p = _table(["", *[name for name, _ in cols]], rows)
    mem = res["idle"]["memory"]
    per_job = res["idle"].get("worker_cpu_ms_per_job")
    steady = None
    if per_job is not None and load.get("cpu_us_per_token") and load["jobs"]:
        tokens_per_job = load["tokens"] / load["jobs"]
        steady = load["cpu_us_per_token"] - per_job * 1000 / max(1.0, tokens_per_job)
    split = res["idle"]["first_token"].get("p50_split_ms") or {}
    notes = (
        "Added first-token time, p50 by part (ms): enqueue to claim "
        f"{_f(split.get('enqueued_to_claimed'))}, claim to first entry stored minus the "
        f"model's ttft {_f(split.get('claimed_to_stored_minus_ttft'))}, Redis to tailer "
        f"{_f(split.get('stored_to_tailer'))}.\n"
        f"Floor (a) CPU per token, run before and after the load: "
        f"{' / '.join(_f(x, 1) for x in floor.get('cpu_us_per_token_runs', []))} us "
        f"(the mean is the floor).{_rounds(load)}\n"
        f"Worker CPU per job (claim, build, finish, Celery; "
        f"{res['options'].get('cost_jobs', '?')} one-token jobs): {_f(per_job)} ms; per token "
        f"without it: {_f(steady, 1)} us ({_f(_ratio(steady, floor['cpu_us_per_token']))}x "
        f"floor).{_redis_per_job(res['idle'].get('redis_cpu_ms_per_job'))}"
        f"{_by_thread(load, floor)}\n"
        f"Redis, a job of {mem['entries_per_job']:.0f} entries: stream "
        f"{mem['stream_bytes_per_job']:.0f} B ({mem['bytes_per_entry']:.0f} B/entry on average, "
        f"{mem['marginal_bytes_per_entry']:.0f} B/entry marginal), record "
        f"{mem['record_bytes_per_job']:.0f} B, fixed {mem['fixed_bytes_per_job']:.0f} B.\n"
        f"prefork (c) in the same memory as actorq's worker: "
        f"{_f(_same_memory(load, prefork), 0)} streams vs {load['peak_concurrent']}."
        f"{_command_split(load, res['fanin'])}"
    )
    cap = res.get("capacity") or capacity(res)
    m = res.get("machine", {})
    notes += (
        f"\nCapacity at the nominal rates ({_f(cap['load_nominal_tokens_per_s'], 0)} tokens/s "
        f"load, {_f(cap['fanin_nominal_tokens_per_s'], 0)} fan-in): floor (a) alone takes "
        f"{_f(cap['floor_cores_at_load_rate'])} of one core, so one process keeps up only "
        f"below {_f(cap['worker_ceiling_vs_floor'])}x the floor; actorq's worker took "
        f"{_f(cap['worker_cores_at_load_rate'])} core; worker + router + Redis took "
        f"{_f(cap['load_machine_cores'])} (load) and {_f(cap['fanin_machine_cores'])} "
        f"(fan-in) of the machine's {m.get('cpus')} CPUs. One Redis core carries "
        f"~{_f(cap['redis_core_tokens_per_s_load'], 0)} tokens/s at the load's cost per "
        f"token, ~{_f(cap['redis_core_tokens_per_s_fanin'], 0)} at the fan-in's."
    )
    notes += _waits(load, res["fanin"])
    seconds = [x for x in load.get("timeline", []) if x["lag_p50_ms"] is not None]
    if seconds:
        notes += (
            "\nactorq lag by second of the load (tokens/s: p50/p99 ms, p99 of it before "
            "Redis): "
            + ", ".join(
                f"{x['tokens']}: {x['lag_p50_ms']:.0f}/{x['lag_p99_ms']:.0f}"
                f" ({x.get('to_redis_p99_ms') or 0:.0f})"
                for x in seconds
            )
        )
    notes += (
        f"\nmachine: {m.get('cpus')} CPUs{_model(m)}, load average after the run "
        f"{', '.join(f'{x:.2f}' for x in m.get('load_avg_after', ()))}; uvloop "
        f"{'on' if m.get('uvloop') else 'off'}, hiredis {'on' if m.get('hiredis') else 'off'}; "
        f"Redis {m.get('redis_version')}, stream-node-max-entries {m.get('stream_node_max_entries')}."
    )
    failed = [k for k in ("load", "fanin", "naive", "prefork") if res[k]["succeeded"] < res[k]["jobs"]]
    warn = f"\nWARNING: unfinished jobs in {', '.join(failed)}" if failed else ""
    return f"\n{t}\n\n{p}\n\n{notes}{warn}"


def _waits(load: dict[str, Any], fanin: dict[str, Any]) -> str:
    """Each process's run-queue time in the load and the fan-in (``cpu_wait``)."""

    def phase(d: dict[str, Any]) -> str | None:
        waits = d.get("cpu_wait") or {}
        names = {"worker": "worker's event loop", "router": "router", "redis": "Redis"}
        if not all(waits.get(key) for key in names):
            return None
        parts = [(name, waits[key]) for key, name in names.items()]
        return ", ".join(
            f"{name} {w['busiest_waiting']:.0%} (running {w['busiest_running']:.0%})"
            for name, w in parts
        )

    load_part, fanin_part = phase(load), phase(fanin)
    if load_part is None or fanin_part is None:
        return ""
    return (
        "\nRunnable but waiting for a CPU, share of the phase's wall time, each process's "
        f"busiest thread: load {load_part}; fan-in {fanin_part}. On a busy machine that "
        "queueing is in every token's lag."
    )


def _by_thread(load: dict[str, Any], floor: dict[str, Any]) -> str:
    """The load's worker CPU per token by thread (``worker_cpu_us_per_token_by_thread``)."""
    split = load.get("worker_cpu_us_per_token_by_thread") or {}
    if not all(split.get(k) is not None for k in ("loop", "main", "other")):
        return ""
    return (
        f"\nWorker CPU per token by thread, in the load: event loop {_f(split['loop'], 1)} us "
        f"({_f(_ratio(split['loop'], floor['cpu_us_per_token']))}x floor), Celery's intake "
        f"(main thread) {_f(split['main'], 1)}, pool threads and the rest "
        f"{_f(split['other'], 1)}."
    )


def _rounds(load: dict[str, Any]) -> str:
    rounds = load.get("rounds") or []
    if len(rounds) < 2:
        return ""
    each = ", ".join(
        f"{_f(r['cpu_vs_floor'])} ({_f(r['worker_cpu_us_per_token'], 1)} / "
        f"{_f(r['floor_cpu_us_per_token'], 1)} us)"
        for r in rounds
    )
    return (
        f"\nCPU vs floor by round, worker / floor: {each}; the tables give round "
        f"{load['reported_round']}, the median."
    )


def _model(machine: dict[str, Any]) -> str:
    return f" ({machine['cpu_model']})" if machine.get("cpu_model") else ""


def _redis_per_job(ms: float | None) -> str:
    """Redis's CPU for a one-token job, enqueue to ack, and the job rate of one core."""
    if not ms:
        return ""
    return (
        f" Redis CPU per one-token job (enqueue to ack): {_f(ms)} ms, so one Redis core "
        f"carries ~{_f(1000 / ms, 0)} such jobs/s."
    )


def _command_split(load: dict[str, Any], fanin: dict[str, Any]) -> str:
    """Redis's busiest commands, load / fan-in, in microseconds per token."""
    a = load.get("redis_command_us_per_token") or {}
    b = fanin.get("redis_command_us_per_token") or {}
    top = sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0) + b.get(k, 0)))[:4]
    if not top:
        return ""
    parts = [f"{k} {_f(a.get(k), 1)} / {_f(b.get(k), 1)}" for k in top]
    return "\nRedis time by command, us per token (load / fan-in): " + ", ".join(parts) + "."


def _same_memory(ours: dict[str, Any], prefork: dict[str, Any]) -> float | None:
    per = _per_gib(prefork)
    pss = ours.get("worker_pss_bytes")
    return per * pss / GIB if per and pss else None


def write_plot(lags: dict[str, list[float]], path: Path) -> Path | None:
    """Lag distributions (ECDF, log scale) as a PNG; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = {"load": "actorq", "fanin": "actorq fan-in", "naive": "naive XADD (b)",
              "prefork": "prefork + asyncio.run (c)"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, values in lags.items():
        if not values:
            continue
        xs = sorted(max(v, 0.01) for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{labels.get(key, key)} (n={len(xs):,})")
    ax.set_xscale("log")
    ax.set_xlabel("delivery lag: model yield to tailer (ms)")
    ax.set_ylabel("fraction of tokens")
    ax.axvline(5, color="grey", linestyle=":", linewidth=1)
    ax.axvline(25, color="grey", linestyle="--", linewidth=1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
