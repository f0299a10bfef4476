"""The `cafe-gateway` command: `serve`, and `keys create|list|disable`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import ConfigError, Settings
from gateway.keys import (
    KeysFileError,
    KeyStore,
    check_origin,
    check_platform,
    disable_key,
    mint_key,
    read_keys_file,
    update_keys_file,
)
from gateway.logs import setup_logging
from gateway.ratelimit import BucketTable
from gateway.schemas import load_record_types
from gateway.server import serve
from gateway.workers import run_workers


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one subcommand; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"cafe-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        status: int = args.run(args, settings)
    except (KeysFileError, ValueError) as exc:
        print(f"cafe-gateway: {exc}", file=sys.stderr)
        return 1
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cafe-gateway", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP gateway (settings: CAFE_* env)")
    serve.set_defaults(run=_serve)

    # --keys-file goes before or after the action. Neither copy has a default, so the one
    # not given leaves the other alone; given twice, the one after the action wins.
    keys_file = argparse.ArgumentParser(add_help=False)
    keys_file.add_argument(
        "--keys-file",
        type=Path,
        default=argparse.SUPPRESS,
        help="the keys file (default: $CAFE_KEYS_FILE)",
    )
    keys = commands.add_parser("keys", parents=[keys_file], help="manage API keys in the keys file")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    create = key_commands.add_parser(
        "create",
        parents=[keys_file],
        help="mint a key and print it (the only time it is shown)",
    )
    create.add_argument(
        "--platform",
        action="append",
        required=True,
        type=check_platform,
        help="a productPlatform the key may write (repeat for several)",
    )
    create.add_argument(
        "--origin",
        action="append",
        default=[],
        type=check_origin,
        help="a web origin (https://app.example.com) whose pages may use the key (repeat)",
    )
    create.add_argument(
        "--browser",
        action="store_true",
        help="a browser key: may also be sent as ?api_key= (sendBeacon), from its origins only",
    )
    for limit in ("requests", "records"):
        create.add_argument(
            f"--{limit}-per-second",
            type=_positive,
            metavar="N",
            help=f"limit the key to N {limit} a second, summed over workers (default: none)",
        )
    create.set_defaults(run=_keys_create)
    key_commands.add_parser(
        "list", parents=[keys_file], help="list key ids, platforms, state"
    ).set_defaults(run=_keys_list)
    disable = key_commands.add_parser("disable", parents=[keys_file], help="disable a key by id")
    disable.add_argument("key_id")
    disable.set_defaults(run=_keys_disable)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if settings.keys_file is None:
        print(
            "cafe-gateway: set CAFE_KEYS_FILE: without API keys no request gets in", file=sys.stderr
        )
        return 2
    setup_logging(settings.log_level, settings.log_format)
    if settings.workers == 1:
        return _serve_one(settings)
    # A keys file or a schema that cannot be loaded stops start-up here, with its
    # reason, rather than in every worker.
    KeyStore(settings.keys_file).load()
    load_record_types(settings.kafka.topics.by_record_type(), settings.validator)
    # Made before the fork, so that every worker inherits it: a key's rate is then
    # shared by all workers, whichever of them its connections land on.
    buckets = BucketTable()
    # Fork before any event loop, thread or socket exists, so each worker starts clean.
    return run_workers(
        settings.workers, lambda metrics_dir: _serve_one(settings, buckets, metrics_dir)
    )


def _serve_one(
    settings: Settings, buckets: BucketTable | None = None, metrics_dir: Path | None = None
) -> int:
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(settings, buckets, metrics_dir))
    finally:
        loop.close()
    return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _keys_path(args: argparse.Namespace, settings: Settings) -> Path:
    path: Path | None = getattr(args, "keys_file", None) or settings.keys_file
    if path is None:
        raise ValueError("no keys file: pass --keys-file or set CAFE_KEYS_FILE")
    return path


def _keys_create(args: argparse.Namespace, settings: Settings) -> int:
    path = _keys_path(args, settings)
    plaintext, record = mint_key(
        tuple(args.platform),
        requests_per_second=args.requests_per_second,
        records_per_second=args.records_per_second,
        origins=tuple(args.origin),
        browser=args.browser,
    )
    update_keys_file(path, lambda keys: [*keys, record])
    print(f"created key {record.id} for {', '.join(record.platforms)} in {path}", file=sys.stderr)
    print(plaintext)
    return 0


def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    keys = read_keys_file(_keys_path(args, settings))
    for key in keys:
        state = "enabled" if key.enabled else "disabled"
        limits = [
            f"{rate:g} {what}/s"
            for rate, what in (
                (key.requests_per_second, "requests"),
                (key.records_per_second, "records"),
            )
            if rate is not None
        ]
        print(
            f"{key.id}\t{state}\t{key.created}\t{','.join(key.platforms)}"
            f"\t{', '.join(limits) or 'unlimited'}"
        )
    return 0


def _keys_disable(args: argparse.Namespace, settings: Settings) -> int:
    path = _keys_path(args, settings)
    try:
        update_keys_file(path, lambda keys: disable_key(keys, args.key_id))
    except KeyError:
        print(f"cafe-gateway: no key with id {args.key_id} in {path}", file=sys.stderr)
        return 1
    print(f"disabled key {args.key_id}", file=sys.stderr)
    return 0
