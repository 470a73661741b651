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
    p.add_argument("--idle-jobs", type=int, help="jobs for first-token latency (30)")
    p.add_argument("--memory-jobs", type=int, help="jobs for Redis memory (50)")
    p.add_argument("--tail-jobs", type=int, help="concurrent tails of the fan-in phase (1000)")
    p.add_argument("--tail-tokens", type=int, help="tokens per fan-in job (30)")
    p.add_argument("--tail-delay-ms", type=float, help="inter-token delay, fan-in (100)")
    p.add_argument("--prefork", type=int, help="children of the prefork peer (4)")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio loops")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default="bench-out", help="directory for JSON and PNG")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("keygen", help="print a new ACTORQ_SECRET_KEY")
    p.set_defaults(func=_cmd_keygen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
