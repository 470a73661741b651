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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
