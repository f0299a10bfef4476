"""The `cafe-gateway` command: `serve`, and `keys create|import|list|enable|disable|
update|rotate`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config import CLIENT_IP_MODES, ConfigError, Settings, _duration
from gateway.keys.file import read_keys_file, read_last_used, update_keys_file
from gateway.keys.model import (
    ApiKey,
    InvalidKey,
    KeysFileError,
    NoSuchKey,
    change_key,
    check_origin,
    check_platform,
    import_key,
    mint_key,
    rotate_key,
)
from gateway.keys.store import KeyStore
from gateway.keys.strength import MAX_KEY_LENGTH
from gateway.limits.local import BucketTable
from gateway.logs import setup_logging
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
    except (KeysFileError, NoSuchKey, ValueError) as exc:
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
    for action, run, what in (
        ("create", _keys_create, "mint a key and print it (the only time it is shown)"),
        ("import", _keys_import, "store a key made elsewhere, read from stdin; print its id"),
        (
            "list",
            _keys_list,
            "list keys: id, state, created, expires, last used, platforms, client ip, limits",
        ),
        ("enable", _keys_enable, "enable a key by id (and clear its expiry)"),
        ("disable", _keys_disable, "disable a key by id"),
        (
            "update",
            _keys_update,
            "change a key's platforms, origins, browser flag, limits or client-IP mode",
        ),
        ("rotate", _keys_rotate, "mint a successor with the same settings; the old key expires"),
    ):
        command = key_commands.add_parser(action, parents=[keys_file], help=what)
        command.set_defaults(run=run)
        if action not in ("create", "import", "list"):
            command.add_argument("key_id")
        if action in ("create", "import", "update"):
            _key_options(command, update=action == "update")
        if action == "rotate":
            command.add_argument(
                "--grace",
                type=_grace,
                default=7 * 86400,
                metavar="DURATION",
                help="how long the old key keeps working: seconds, or 15m, 24h, 7d (default 7d)",
            )
    return parser


def _key_options(command: argparse.ArgumentParser, *, update: bool = False) -> None:
    """The options that set what a key may do, for `create` and `import`, or `update`.

    For `update` nothing has a default, so an option not given is absent from the parsed
    arguments and leaves the key's setting as it is.
    """
    unchanged: dict[str, Any] = {"default": argparse.SUPPRESS} if update else {}
    command.add_argument(
        "--platform",
        action="append",
        required=not update,
        type=check_platform,
        help="a productPlatform the key may write (repeat for several"
        + ("; replaces the list)" if update else ")"),
        **unchanged,
    )
    origins = command.add_mutually_exclusive_group()
    origins.add_argument(
        "--origin",
        action="append",
        type=check_origin,
        help="a web origin (https://app.example.com) whose pages may use the key (repeat"
        + ("; replaces the list)" if update else ")"),
        **(unchanged or {"default": []}),
    )
    if update:
        origins.add_argument(
            "--no-origins",
            dest="origin",
            action="store_const",
            const=[],
            help="the key lists no origins: no web page may use it",
            **unchanged,
        )
    command.add_argument(
        "--browser",
        action=argparse.BooleanOptionalAction if update else "store_true",
        help="a browser key: may also be sent as ?api_key= (sendBeacon), from its origins only",
        **unchanged,
    )
    for limit in ("requests", "records"):
        command.add_argument(
            f"--{limit}-per-second",
            type=_rate if update else _positive,
            metavar="N|none" if update else "N",
            help=f"limit the key to N {limit} a second, summed over workers "
            + ("('none': no limit)" if update else "(default: none)"),
            **unchanged,
        )
    if update:
        command.add_argument(
            "--client-ip",
            choices=(*CLIENT_IP_MODES, "default"),
            help="what is kept of the caller's address beside the key's records; "
            "'default': what CAFE_CLIENT_IP says",
            **unchanged,
        )


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
    KeyStore(settings.keys_file, can_hash_client_ip=settings.client_ip.hash_key is not None).load()
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


def _rate(text: str) -> float | None:
    """A limit for `update`: a positive number, or `none` to lift it."""
    if text.lower() == "none":
        return None
    try:
        return _positive(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number or none") from None


# The same durations CAFE_SPOOL_MAX_AGE takes; at most a year, 0 for "now".
_grace_seconds = _duration(0, 366 * 86400)


def _grace(text: str) -> float:
    try:
        return _grace_seconds("--grace", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def _keys_import(args: argparse.Namespace, settings: Settings) -> int:
    """Store a key made elsewhere. It comes on stdin, never in argv, which `ps` shows."""
    path = _keys_path(args, settings)
    if sys.stdin.isatty():
        plaintext = getpass.getpass("API key to import (not echoed): ")
    else:
        # A bounded read: more than a key's length is refused anyway.
        plaintext = sys.stdin.read(MAX_KEY_LENGTH + 3)
        plaintext = plaintext.removesuffix("\n").removesuffix("\r")
    record = import_key(
        plaintext,
        tuple(args.platform),
        requests_per_second=args.requests_per_second,
        records_per_second=args.records_per_second,
        origins=tuple(args.origin),
        browser=args.browser,
    )

    def add(keys: list[ApiKey]) -> list[ApiKey]:
        # Checked under the lock, so two imports of one key cannot both get in.
        for key in keys:
            if key.sha256 == record.sha256:
                raise InvalidKey(f"this key is already in the keys file as {key.id}")
        return [*keys, record]

    update_keys_file(path, add)
    print(f"imported key {record.id} for {', '.join(record.platforms)} in {path}", file=sys.stderr)
    print(record.id)
    return 0


def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    """One line per key: id, state, created, expires, last used, platforms, what is kept
    of the caller's address (`default`: what CAFE_CLIENT_IP says), limits.

    "Last used" is approximate: gateways write it once a minute, per host (see
    `gateway.keys.file.read_last_used`); a key used less than a minute ago may show older.
    """
    path = _keys_path(args, settings)
    keys = read_keys_file(path)
    last_used = read_last_used(path)
    now = time.time()
    for key in keys:
        state = key.state(now)
        limits = [
            f"{rate:g} {what}/s"
            for rate, what in (
                (key.requests_per_second, "requests"),
                (key.records_per_second, "records"),
            )
            if rate is not None
        ]
        print(
            f"{key.id}\t{state}\t{key.created}\t{key.expires_at or '-'}"
            f"\t{last_used.get(key.id, 'never')}\t{','.join(key.platforms)}"
            f"\t{key.client_ip or 'default'}\t{', '.join(limits) or 'unlimited'}"
        )
    return 0


def _change(
    args: argparse.Namespace, settings: Settings, change: Callable[[ApiKey], ApiKey]
) -> ApiKey:
    """Apply `change` to the key `args.key_id` under the file's lock; returns the key as it
    was. NoSuchKey if there is none; what `change` raises leaves the file as it was."""
    before: list[ApiKey] = []

    def change_one(key: ApiKey) -> ApiKey:
        before.append(key)
        return change(key)

    update_keys_file(
        _keys_path(args, settings), lambda keys: change_key(keys, args.key_id, change_one)
    )
    return before[0]


def _keys_enable(args: argparse.Namespace, settings: Settings) -> int:
    # An enabled key that has expired would still be refused: enabling it means use it.
    was = _change(args, settings, lambda key: replace(key, enabled=True, expires_at=None))
    print(f"enabled key {args.key_id}", file=sys.stderr)
    if was.expires_at is not None:
        print(f"cleared its expiry (was {was.expires_at})", file=sys.stderr)
    return 0


def _keys_disable(args: argparse.Namespace, settings: Settings) -> int:
    _change(args, settings, lambda key: replace(key, enabled=False))
    print(f"disabled key {args.key_id}", file=sys.stderr)
    return 0


# `update`'s options and the fields of ApiKey they set.
_UPDATABLE = {
    "platform": "platforms",
    "origin": "origins",
    "browser": "browser",
    "requests_per_second": "requests_per_second",
    "records_per_second": "records_per_second",
    "client_ip": "client_ip",
}


def _keys_update(args: argparse.Namespace, settings: Settings) -> int:
    # Options not given are absent (see _key_options), so they change nothing.
    given = {option: value for option, value in vars(args).items() if option in _UPDATABLE}
    # A repeated option comes as a list; the model holds a tuple, each value once.
    changes: dict[str, Any] = {
        _UPDATABLE[option]: tuple(dict.fromkeys(value)) if isinstance(value, list) else value
        for option, value in given.items()
    }
    if not changes:
        raise ValueError(
            "nothing to update: give --platform, --origin, --no-origins, --[no-]browser, "
            "--requests-per-second, --records-per-second or --client-ip"
        )
    if changes.get("client_ip") == "default":
        changes["client_ip"] = None  # the key follows the gateway's setting again
    # A gateway without the secret refuses the whole keys file (KeyStore): checked here
    # too, with this command's settings, which are the gateway's where it runs beside it.
    if changes.get("client_ip") == "hashed" and settings.client_ip.hash_key is None:
        raise ValueError(
            "--client-ip hashed needs CAFE_CLIENT_IP_HASH_KEY_FILE set, here as in the "
            "gateways: a gateway without that secret would refuse the keys file"
        )
    # ApiKey checks its rules on `replace`: a change that breaks one is refused unwritten.
    _change(args, settings, lambda key: replace(key, **changes))
    print(f"updated {', '.join(changes)} of key {args.key_id}", file=sys.stderr)
    return 0


def _keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    minted: list[tuple[str, ApiKey, ApiKey]] = []

    def rotate(keys: list[ApiKey]) -> list[ApiKey]:
        plaintext, successor, changed = rotate_key(keys, args.key_id, args.grace, time.time())
        old = next(k for k in changed if k.id == args.key_id)
        minted.append((plaintext, successor, old))
        return changed

    update_keys_file(_keys_path(args, settings), rotate)
    ((plaintext, successor, old),) = minted
    print(
        f"created key {successor.id}: {successor.id} replaces {old.id}, which stops working "
        f"at {old.expires_at}",
        file=sys.stderr,
    )
    print(plaintext)
    return 0
