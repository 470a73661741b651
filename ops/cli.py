"""The ``actorq`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .local import run_demo

    config = json.loads(Path(args.config).read_text()) if args.config else None
    return run_demo(args.prompt, delay_ms=args.delay_ms, config=config)


def _cmd_up(args: argparse.Namespace) -> int:
    from .local import run_up

    return run_up(args.concurrency)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from producer.crypto import generate_key

    print(generate_key())
    return 0


def _cmd_tiktoken_fetch(args: argparse.Namespace) -> int:
    from worker.runtime.usage import EncodingFetchError, fetch_encodings

    try:
        paths = fetch_encodings(
            args.encoding or None, base_url=args.base_url, cache_dir=args.cache_dir
        )
    except (EncodingFetchError, OSError) as exc:
        print(f"actorq tiktoken-fetch: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import os

    from .commands import worker_argv

    try:
        argv = worker_argv(
            concurrency=args.concurrency,
            queue=args.queue,
            hostname=args.hostname,
            loglevel=args.loglevel,
            extra=_rest(args.celery_args),
        )
    except ValueError as exc:  # a setting from the environment
        print(f"actorq worker: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(argv[0], argv)  # celery gets the signals itself (warm shutdown on SIGTERM)
    return 0  # pragma: no cover


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _rest(extra: list[str]) -> list[str]:
    return extra[1:] if extra[:1] == ["--"] else extra


def _cmd_enqueue(args: argparse.Namespace) -> int:
    from .commands import run_enqueue

    return int(
        run_enqueue(
            config=args.config,
            message=args.message,
            credentials=args.credentials,
            limits=args.limits,
            pricing=args.pricing,
            job_id=args.job_id,
            idempotency_key=args.idempotency_key,
            follow=args.follow,
            as_json=args.json,
            timeout=args.timeout,
        )
    )


def _cmd_tail(args: argparse.Namespace) -> int:
    from .commands import run_tail

    return int(run_tail(args.job_id, after=args.after, as_json=args.json, timeout=args.timeout))


def _cmd_status(args: argparse.Namespace) -> int:
    from .commands import run_status

    return int(run_status(args.job_id, as_json=args.json))


def _cmd_cancel(args: argparse.Namespace) -> int:
    from .commands import run_cancel

    return int(run_cancel(args.job_id, as_json=args.json))


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .commands import run_jobs

    return int(run_jobs(limit=args.limit, status=args.status, as_json=args.json))


def _cmd_flower(args: argparse.Namespace) -> int:
    from .flower import FlowerOptions, run_flower

    return run_flower(
        FlowerOptions(
            port=args.port,
            address=args.address,
            basic_auth=args.basic_auth or [],
            local=args.local,
            read_only=args.read_only,
            url_prefix=args.url_prefix or "",
            extra=_rest(args.flower_args),
        )
    )


def _cmd_router(args: argparse.Namespace) -> int:
    try:
        from .router import serve
    except ImportError as exc:
        print(f"actorq: the example router needs the router extra ({exc})", file=sys.stderr)
        return 2
    return serve(args.host, args.port)


EXIT_CODES = """exit codes of enqueue --follow and tail (the job's final status), status, cancel, jobs:
  0 succeeded / done   1 failed   2 bad arguments or input   3 no such job
  4 cancelled   5 timed_out   6 limit_exceeded   7 --timeout passed   8 Redis/broker unreachable
"""


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import BenchOptions, run_bench

    knobs = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k in BenchOptions.__dataclass_fields__
    }
    knobs["out_dir"] = Path(args.out)
    knobs["uvloop"] = not args.no_uvloop
    knobs["plot"] = not args.no_plot
    try:
        opts = BenchOptions.quick(**knobs) if args.quick else BenchOptions(**knobs)
    except ValueError as exc:
        print(f"actorq bench: {exc}", file=sys.stderr)
        return 2
    run_bench(opts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actorq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run one job end to end on a local (embedded) stack")
    p.add_argument("prompt", nargs="?", default="Hello, actorq!")
    p.add_argument("--delay-ms", type=float, default=40.0, help="delay between tokens")
    p.add_argument("--config", help="actor config JSON file (default: the scripted demo actor)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("up", help="keep Redis + a worker running for local development")
    p.add_argument("--concurrency", type=int, default=100)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("bench", help="measure streaming speed and memory against three peers")
    p.add_argument("--quick", action="store_true", help="a small run (seconds, not minutes)")
    p.add_argument("--jobs", type=int, help="concurrent jobs on one worker (300)")
    p.add_argument("--tokens", type=int, help="tokens per job (200)")
    p.add_argument("--delay-ms", type=float, help="inter-token delay of the model (20)")
    p.add_argument("--ttft-ms", type=float, help="model time to first token (100)")
    p.add_argument(
        "--ramp-s", type=float, help="load and floor start their jobs over this long (1.0)"
    )
    p.add_argument("--idle-jobs", type=int, help="jobs for first-token latency (30)")
    p.add_argument("--memory-jobs", type=int, help="jobs for Redis memory (50)")
    p.add_argument(
        "--cost-jobs", type=int, help="one-token jobs for what each job pays once (300)"
    )
    p.add_argument("--tail-jobs", type=int, help="concurrent tails of the fan-in phase (1000)")
    p.add_argument("--tail-tokens", type=int, help="tokens per fan-in job (150)")
    p.add_argument("--tail-delay-ms", type=float, help="inter-token delay, fan-in (100)")
    p.add_argument("--prefork", type=int, help="children of the prefork peer (4)")
    p.add_argument(
        "--rounds", type=int, help="load runs, each between two floor runs; median reported (3)"
    )
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio loops")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default="bench-out", help="directory for JSON and PNG")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("keygen", help="print a new ACTORQ_SECRET_KEY")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser(
        "tiktoken-fetch",
        help="download tiktoken encodings into TIKTOKEN_CACHE_DIR (for images built with network)",
    )
    p.add_argument("--encoding", action="append", help="cl100k_base, o200k_base (default: both)")
    p.add_argument("--base-url", help="a mirror serving the same file names")
    p.add_argument("--cache-dir", help="default: TIKTOKEN_CACHE_DIR, as tiktoken reads it")
    p.set_defaults(func=_cmd_tiktoken_fetch)

    _add_job_commands(sub)
    return parser


def _add_job_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "worker",
        help="run a worker (celery, threads pool, one shared event loop)",
        description="Run `celery -A worker.app worker` with actorq's defaults. "
        "Arguments after -- go to celery unchanged.",
    )
    p.add_argument(
        "--concurrency", type=int, help="jobs streamed at once (ACTORQ_CONCURRENCY, 200)"
    )
    p.add_argument("--queue", help="queue(s) to consume (default ACTORQ_QUEUE, actorq)")
    p.add_argument("--hostname", help="worker node name, e.g. w1@%%h")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="-- then extra celery options")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser(
        "enqueue",
        help="enqueue a job; print its id (or --follow it)",
        epilog=EXIT_CODES,
        formatter_class=raw,
    )
    p.add_argument("message", help="the message for the actor ('-' reads stdin)")
    p.add_argument("--config", required=True, help="actor config JSON file ('-' reads stdin)")
    p.add_argument("--credentials", help="credentials JSON file: {provider: {api_key: ...}}")
    p.add_argument(
        "--limits", help="limits as a JSON object or file, e.g. '{\"timeout_ms\": 60000}'"
    )
    p.add_argument("--pricing", help="pricing JSON file: {model: {input: USD/M, output: USD/M}}")
    p.add_argument("--job-id", help="choose the job id ([A-Za-z0-9_-]{1,64})")
    p.add_argument("--idempotency-key", help="enqueue at most once per key")
    p.add_argument("--follow", "-f", action="store_true", help="stream the job until it ends")
    p.add_argument("--timeout", type=float, help="with --follow: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="JSON output (events as JSON lines)")
    p.set_defaults(func=_cmd_enqueue)

    p = sub.add_parser(
        "tail", help="stream a job's events until it ends", epilog=EXIT_CODES, formatter_class=raw
    )
    p.add_argument("job_id")
    p.add_argument("--after", default="0", help="resume after this stream entry id")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser(
        "status", help="a job's status and record", epilog=EXIT_CODES, formatter_class=raw
    )
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", help="stop a job", epilog=EXIT_CODES, formatter_class=raw)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("jobs", help="recent jobs with status, tokens and cost")
    p.add_argument("--limit", type=_positive_int, default=20, help="how many (20)")
    p.add_argument("--status", help="only jobs with this status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser(
        "flower",
        help="the Flower dashboard on the configured broker (auth required)",
        description="Start Flower with authentication (or --local), optional read-only "
        "mode and URL prefix. Arguments after -- go to Flower unchanged.",
    )
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", help="bind address (default 0.0.0.0; 127.0.0.1 with --local)")
    p.add_argument(
        "--basic-auth",
        action="append",
        metavar="USER:PASSWORD",
        help="repeatable; prefer FLOWER_BASIC_AUTH so it stays out of `ps`",
    )
    p.add_argument(
        "--local", action="store_true", help="allow no authentication (this machine only)"
    )
    p.add_argument("--read-only", action="store_true", help="refuse every control action (403)")
    p.add_argument("--url-prefix", help="serve under this path, behind a reverse proxy")
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then extra Flower options")
    p.set_defaults(func=_cmd_flower)

    p = sub.add_parser("router", help="the example SSE router (needs the router extra)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_router)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
