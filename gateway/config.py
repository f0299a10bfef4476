"""Settings: frozen dataclasses built once from `CAFE_*` environment variables.

Each setting is declared once, on its field, as a row of
`_var(variable, default, parser, meaning)`; the parser holds the bounds. `Settings.from_env`
reads every declared variable in one walk over the fields, nested settings included, then
applies the rules that tie settings together. `declared_variables()` lists the declarations,
and tests/test_config.py checks the configuration table of docs/configuration.md against them.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import ipaddress
import logging
import os
import re
import shlex
import shutil
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# CAFE_MAX_QUEUED_BYTES, unset, is this many times CAFE_MAX_INFLIGHT_BYTES (and at least
# CAFE_MAX_BODY_BYTES): room for the records of requests answered 503 that the sink still
# delivers, beside those in flight.
_QUEUED_PER_INFLIGHT = 4
_MAX_BODY_BYTES = 10 * 1024 * 1024
_MAX_INFLIGHT_BYTES = 8 * 1024 * 1024
_T = TypeVar("_T")
_N = TypeVar("_N", int, float)
_D = TypeVar("_D", bound="DataclassInstance")
# Reads one variable: (its name, its value stripped and not blank) -> the setting's value.
Parser = Callable[[str, str], _T]
# Kafka's own rule for topic names.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# The key of a field's metadata that holds its Variable.
_VARIABLE = "cafe_variable"
# What may be kept of the caller's address beside its records (CAFE_CLIENT_IP, and a
# key's own choice): gateway/http/clientip.py says what each keeps.
CLIENT_IP_MODES = ("full", "truncated", "hashed", "off")
# A shorter hash secret could be found from one address and its hash by trying them all.
_MIN_SECRET_BYTES = 16

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with; the message names the variable."""


@dataclass(frozen=True)
class Variable(Generic[_T]):
    """The environment variable a setting is read from, how it is read, and what it means."""

    name: str
    parse: Parser[_T]
    meaning: str


def _var(name: str, default: _T, parse: Parser[_T], meaning: str) -> _T:
    """A settings field read from the variable `name`; unset or blank, it keeps `default`."""
    return field(default=default, metadata={_VARIABLE: Variable(name, parse, meaning)})


# Parsers. Each refuses a bad value with a ConfigError that names the variable.


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw)


def _integer(low: int, high: int) -> Parser[int]:
    """An integer within low..high."""

    def parse(name: str, raw: str) -> int:
        return _number(name, raw, int, "an integer", low, high)

    return parse


def _seconds(name: str, raw: str) -> float:
    return _number(name, raw, float, "a number of seconds", 0, 3600)


def _number(
    name: str, raw: str, parse: Callable[[str], _N], what: str, low: float, high: float
) -> _N:
    """A number within low..high (a NaN is within nothing)."""
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {what}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw} is outside {low}..{high}")
    return value


def _ratio(name: str, raw: str) -> float:
    return _number(name, raw, float, "a number from 0 to 1", 0, 1)


def _http_url(name: str, raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(f"{name}={raw!r} is not an http:// or https:// URL")
    return raw


# What CAFE_TRACE_SAMPLE_RATIO > 0 imports (the `otel` extra).
_OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")


def _installed(*modules: str) -> bool:
    """Whether each module can be imported, without importing it."""
    try:
        return all(importlib.util.find_spec(module) is not None for module in modules)
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _choice(*choices: str) -> Parser[str]:
    """One of `choices`, in any case; returned as declared."""

    def parse(name: str, raw: str) -> str:
        for choice in choices:
            if raw.lower() == choice.lower():
                return choice
        raise ConfigError(f"{name}={raw.lower()!r} is not one of {', '.join(choices)}")

    return parse


@dataclass(frozen=True)
class Secret:
    """A value kept out of logs and reprs: a password given in the environment."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "***"


def _secret(name: str, raw: str) -> Secret:
    return Secret(raw)


def _bool(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (true or false)")


def _log_level(name: str, raw: str) -> str:
    value = raw.upper()
    if value not in logging.getLevelNamesMapping():
        raise ConfigError(f"{name}={value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return value


def _bootstrap(name: str, raw: str) -> str:
    """A comma-separated list of host:port pairs, as Kafka clients take it."""
    for server in raw.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}={raw!r}: {server.strip()!r} is not host:port")
    return raw


def _topic(name: str, raw: str) -> str:
    if not _TOPIC.fullmatch(raw) or raw in {".", ".."}:
        raise ConfigError(f"{name}={raw!r} is not a Kafka topic name ([A-Za-z0-9._-], <= 249)")
    return raw


def _networks(name: str, raw: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128)."""
    networks = []
    for item in raw.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{name}: {item.strip()!r} is not an IP network") from None
    return tuple(networks)


def _ratelimit_storage(name: str, raw: str) -> str:
    """`local`, or the URL of a Redis (redis://, rediss:// or unix://) the fleet shares."""
    if raw.lower() == "local":
        return "local"
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss", "unix") or not rest:
        raise ConfigError(f"{name}={raw!r} is neither local nor a redis:// URL")
    return raw


@dataclass(frozen=True)
class TopicSettings:
    """The topic of each record type, and how many partitions a created topic gets."""

    activity: str = _var("CAFE_TOPIC_ACTIVITY", "cafe.activity", _topic, "activity topic")
    log: str = _var("CAFE_TOPIC_LOG", "cafe.log", _topic, "log topic")
    profile: str = _var("CAFE_TOPIC_PROFILE", "cafe.profile", _topic, "profile topic")
    deadletter: str = _var(
        "CAFE_TOPIC_DEADLETTER", "cafe.deadletter", _topic, "topic of records refused as invalid"
    )
    partitions: int = _var(
        "CAFE_TOPIC_PARTITIONS", 6, _integer(1, 10_000), "partitions of a topic it creates"
    )
    # never: for a principal without the right to create topics, or where topics are
    # made elsewhere (Terraform, a Strimzi KafkaTopic).
    create: str = _var(
        "CAFE_KAFKA_CREATE_TOPICS",
        "auto",
        _choice("auto", "never"),
        "auto: create missing topics at start; never: leave that to an admin",
    )

    def all(self) -> tuple[str, ...]:
        """Every topic the gateway writes to."""
        return (*self.by_record_type().values(), self.deadletter)

    def by_record_type(self) -> dict[str, str]:
        """The topic of each record type, by the type's name (its route and schema)."""
        return {"activity": self.activity, "log": self.log, "profile": self.profile}


_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS_PROTOCOLS = ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class KafkaSecurity:
    """How the gateway proves itself to Kafka, and checks Kafka: TLS and SASL.

    Secrets are best given as files (as a Kubernetes Secret mounts them): they are read
    again at each new connection, so a rotated password or token needs no restart.
    gateway/kafka/auth.py turns these into the client's options.
    """

    protocol: str = _var(
        "CAFE_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL",
    )
    # RUF009 on each Path (and Secret) default: as for keys_file below.
    ca_file: Path | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_SSL_CA_FILE", None, _path, "PEM bundle of the CAs trusted (else the system's)"
    )
    cert_file: Path | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_SSL_CERT_FILE", None, _path, "PEM client certificate, for mutual TLS"
    )
    key_file: Path | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_SSL_KEY_FILE", None, _path, "PEM key of the client certificate"
    )
    key_password_file: Path | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_SSL_KEY_PASSWORD_FILE", None, _path, "file holding the key's passphrase"
    )
    # Off, any certificate a trusted CA signed passes for any broker: say so explicitly.
    check_hostname: bool = _var(
        "CAFE_KAFKA_SSL_CHECK_HOSTNAME",
        True,
        _bool,
        "the broker's certificate must name the host connected to",
    )
    sasl_mechanism: str | None = _var(
        "CAFE_KAFKA_SASL_MECHANISM",
        None,
        _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"),
        "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
    )
    sasl_username: str | None = _var(
        "CAFE_KAFKA_SASL_USERNAME", None, _text, "user name for PLAIN and SCRAM"
    )
    sasl_password: Secret | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_SASL_PASSWORD", None, _secret, "its password (prefer the _FILE form)"
    )
    sasl_password_file: Path | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_SASL_PASSWORD_FILE", None, _path, "file holding the password"
    )
    oauth_token_file: Path | None = _var(  # noqa: RUF009
        "CAFE_KAFKA_OAUTH_TOKEN_FILE",
        None,
        _path,
        "OAUTHBEARER: file holding the token, read again when it changes",
    )
    oauth_token_command: str | None = _var(
        "CAFE_KAFKA_OAUTH_TOKEN_COMMAND",
        None,
        _text,
        "OAUTHBEARER: command printing a token, run again before it expires",
    )
    msk_iam_region: str | None = _var(
        "CAFE_KAFKA_MSK_IAM_REGION",
        None,
        _text,
        "OAUTHBEARER: Amazon MSK IAM tokens for this AWS region (cafe-gateway[msk])",
    )

    def check(self) -> None:
        """Refuse a combination that cannot connect, naming the variables."""
        p = "CAFE_KAFKA_"
        protocol = f"{p}SECURITY_PROTOCOL={self.protocol}"
        sasl = self.protocol in _SASL_PROTOCOLS
        if sasl and self.sasl_mechanism is None:
            raise ConfigError(f"{protocol} needs {p}SASL_MECHANISM")
        if not sasl:
            given = self._given(
                "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD", "SASL_PASSWORD_FILE",
                "OAUTH_TOKEN_FILE", "OAUTH_TOKEN_COMMAND", "MSK_IAM_REGION",
            )  # fmt: skip
            if given:
                raise ConfigError(f"{p}{given[0]} is set, but {protocol} uses no SASL")
        if self.protocol not in _TLS_PROTOCOLS:
            given = self._given(
                "SSL_CA_FILE", "SSL_CERT_FILE", "SSL_KEY_FILE", "SSL_KEY_PASSWORD_FILE"
            )
            if given or not self.check_hostname:
                what = given[0] if given else "SSL_CHECK_HOSTNAME"
                raise ConfigError(f"{p}{what} is set, but {protocol} uses no TLS")
        for name in self._given("SSL_KEY_FILE", "SSL_KEY_PASSWORD_FILE"):
            if self.cert_file is None:
                raise ConfigError(f"{p}{name} is set without {p}SSL_CERT_FILE")
        mechanism = f"{p}SASL_MECHANISM={self.sasl_mechanism}"
        # A setting of the other kind of login would be ignored: say so.
        unused = (
            self._given("OAUTH_TOKEN_FILE", "OAUTH_TOKEN_COMMAND", "MSK_IAM_REGION")
            if self.sasl_mechanism != "OAUTHBEARER"
            else self._given("SASL_USERNAME", "SASL_PASSWORD", "SASL_PASSWORD_FILE")
        )
        if sasl and unused:
            raise ConfigError(f"{p}{unused[0]} is set, but {mechanism} does not use it")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            if self.sasl_username is None:
                raise ConfigError(f"{mechanism} needs {p}SASL_USERNAME")
            if (self.sasl_password is None) == (self.sasl_password_file is None):
                raise ConfigError(
                    f"{mechanism} needs one of {p}SASL_PASSWORD_FILE and {p}SASL_PASSWORD"
                )
        if self.sasl_mechanism == "OAUTHBEARER":
            sources = self._given("OAUTH_TOKEN_FILE", "OAUTH_TOKEN_COMMAND", "MSK_IAM_REGION")
            if len(sources) != 1:
                raise ConfigError(
                    f"{p}SASL_MECHANISM=OAUTHBEARER needs exactly one of {p}OAUTH_TOKEN_FILE, "
                    f"{p}OAUTH_TOKEN_COMMAND and {p}MSK_IAM_REGION"
                )
        for name in (
            "SSL_CA_FILE", "SSL_CERT_FILE", "SSL_KEY_FILE", "SSL_KEY_PASSWORD_FILE",
            "SASL_PASSWORD_FILE", "OAUTH_TOKEN_FILE",
        ):  # fmt: skip
            path = getattr(self, _FIELD_OF[name])
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{p}{name}={path}: no file this process may read")
        if self.oauth_token_command is not None:
            try:
                argv = shlex.split(self.oauth_token_command)
            except ValueError as exc:
                raise ConfigError(f"{p}OAUTH_TOKEN_COMMAND cannot be split: {exc}") from None
            if not argv or shutil.which(argv[0]) is None:
                raise ConfigError(f"{p}OAUTH_TOKEN_COMMAND: no program {argv[:1]} to run")
        if self.msk_iam_region is not None and not importlib.util.find_spec(
            "aws_msk_iam_sasl_signer"
        ):
            raise ConfigError(
                f"{p}MSK_IAM_REGION needs aws-msk-iam-sasl-signer-python: "
                "pip install 'cafe-gateway[msk]'"
            )
        if self.protocol in _TLS_PROTOCOLS:
            self.tls_context()  # the files are read as a connection would read them

    def tls_context(self) -> ssl.SSLContext:
        """A client TLS context: the CA bundle given or the system's, the client certificate
        for mutual TLS if given, and hostname checking unless turned off. The files are
        read now (each new Kafka client reads them again); ConfigError, naming the
        variable, if one cannot be used."""
        ca = self.ca_file
        try:
            context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"CAFE_KAFKA_SSL_CA_FILE={ca} cannot be used: {exc}") from exc
        if self.cert_file is not None:
            try:
                passphrase = None
                if self.key_password_file is not None:
                    passphrase = first_line(self.key_password_file)
                context.load_cert_chain(self.cert_file, self.key_file, password=passphrase)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"CAFE_KAFKA_SSL_CERT_FILE={self.cert_file} (with CAFE_KAFKA_SSL_KEY_FILE "
                    f"and its password file, if set) cannot be used: {exc}"
                ) from exc
        context.check_hostname = self.check_hostname
        return context

    def _given(self, *names: str) -> list[str]:
        """Which of the variables (without CAFE_KAFKA_) are set."""
        return [name for name in names if getattr(self, _FIELD_OF[name]) is not None]


def first_line(path: Path) -> str:
    """A secret in a file: its first line, without the line end an editor adds."""
    return (path.read_text().splitlines() or [""])[0]


# Each security variable's field, by the variable's name without CAFE_KAFKA_.
_FIELD_OF = {
    "SASL_MECHANISM": "sasl_mechanism",
    "SASL_USERNAME": "sasl_username",
    "SASL_PASSWORD": "sasl_password",
    "SASL_PASSWORD_FILE": "sasl_password_file",
    "OAUTH_TOKEN_FILE": "oauth_token_file",
    "OAUTH_TOKEN_COMMAND": "oauth_token_command",
    "MSK_IAM_REGION": "msk_iam_region",
    "SSL_CA_FILE": "ca_file",
    "SSL_CERT_FILE": "cert_file",
    "SSL_KEY_FILE": "key_file",
    "SSL_KEY_PASSWORD_FILE": "key_password_file",
}


class _Derived(int):
    """A max_queued_bytes nobody set: each Settings works it out again from its own limits
    (so a Settings made with `replace` gets it from its new ones)."""


def queued_bytes(max_inflight_bytes: int, max_body_bytes: int) -> int:
    """CAFE_MAX_QUEUED_BYTES when unset: room for the requests admitted at once, several
    times over, and for one request of the largest body."""
    return _Derived(max(_QUEUED_PER_INFLIGHT * max_inflight_bytes, max_body_bytes))


@dataclass(frozen=True)
class KafkaSettings:
    """How the gateway reaches Kafka."""

    bootstrap: str = _var(
        "CAFE_KAFKA_BOOTSTRAP", "127.0.0.1:9092", _bootstrap, "Kafka brokers, host:port,..."
    )
    client_id: str = _var(
        "CAFE_KAFKA_CLIENT_ID", "cafe-gateway", _text, "the client id brokers see"
    )
    # aiokafka is the design's; librdkafka (confluent-kafka, the `librdkafka` extra)
    # produces on threads of its own, off the event loop (gateway/kafka/rdkafka.py).
    client: str = _var(
        "CAFE_KAFKA_CLIENT",
        "aiokafka",
        _choice("aiokafka", "librdkafka"),
        "the Kafka client that produces: aiokafka or librdkafka",
    )
    # Records of concurrent requests share batches anyway while the previous request is in
    # flight; `make bench` measured more records/s and lower latency with 2 than with 5.
    linger_ms: int = _var(
        "CAFE_KAFKA_LINGER_MS", 2, _integer(0, 1000), "extra wait for records to share a batch"
    )
    # zstd: measured by `make bench` (loadtest/codecbench.py), the gateway's CPU per
    # record at W500 and W20 is that of none (fewer bytes for aiokafka to copy pay for
    # compressing), the broker's a third, the log's bytes a few percent; W1 requests/s,
    # whose batches are too small to pay back, are 7-10% fewer (docs/configuration.md,
    # Compression).
    compression: str = _var(
        "CAFE_KAFKA_COMPRESSION",
        "zstd",
        _choice("none", "gzip", "snappy", "lz4", "zstd"),
        "how batches are compressed: none, gzip, snappy, lz4 or zstd",
    )
    request_timeout_ms: int = _var(
        "CAFE_KAFKA_REQUEST_TIMEOUT_MS", 30_000, _integer(1000, 300_000), "Kafka request timeout"
    )
    produce_timeout_ms: int = _var(
        "CAFE_PRODUCE_TIMEOUT_MS",
        5_000,
        _integer(100, 300_000),
        "time for all of a request's records to be acknowledged, else 503",
    )
    # Includes records of requests already answered 503 that the sink still delivers.
    # Healthy traffic holds about what the requests in flight carry, so it must be at least
    # max_inflight_bytes, and at least max_body_bytes (see Settings.__post_init__). Unset,
    # it is worked out from those two by `queued_bytes`, here from their defaults, and again
    # by each Settings from its own.
    max_queued_bytes: int = _var(
        "CAFE_MAX_QUEUED_BYTES",
        queued_bytes(_MAX_INFLIGHT_BYTES, _MAX_BODY_BYTES),
        _integer(1024, 1 << 36),
        "record bytes awaiting acknowledgement, past which requests get 503 at once",
    )
    topics: TopicSettings = field(default_factory=TopicSettings)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)


def _duration(low: float, high: float) -> Parser[float]:
    """A number of seconds within low..high, or with a unit: 90s, 15m, 24h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def parse(name: str, raw: str) -> float:
        unit = units.get(raw[-1:].lower())
        number = raw[:-1] if unit else raw
        seconds = _number(name, number, float, "a duration (seconds, or 15m, 24h, 7d)", 0, high)
        seconds *= unit or 1
        if not low <= seconds <= high:
            raise ConfigError(f"{name}={raw} is outside {low:g}..{high:g} seconds")
        return seconds

    return parse


@dataclass(frozen=True)
class SpoolSettings:
    """The local spool that holds records while Kafka does not acknowledge them."""

    # RUF009: as for keys_file below.
    dir: Path | None = _var(  # noqa: RUF009
        "CAFE_SPOOL_DIR", None, _path, "keep records here while Kafka is away (off if unset)"
    )
    max_bytes: int = _var(
        "CAFE_SPOOL_MAX_BYTES",
        1 << 30,
        _integer(1 << 20, 1 << 44),
        "record bytes each process's spool may hold, past which requests get 503",
    )
    max_age_seconds: float = _var(
        "CAFE_SPOOL_MAX_AGE",
        86400.0,
        _duration(60, 90 * 86400),
        "records spooled longer ago than this are dropped (counted and logged)",
    )
    # Well under CAFE_PRODUCE_TIMEOUT_MS: a client waits this long, plus an fsync, before
    # its records are on disk instead; a healthy Kafka acknowledges in milliseconds.
    after_ms: int = _var(
        "CAFE_SPOOL_AFTER_MS",
        1000,
        _integer(10, 300_000),
        "time for Kafka to acknowledge a request's records before they are spooled",
    )


def fingerprint(secret: bytes) -> str:
    """A short id of a secret that does not give it away: 8 hex digits of its SHA-256."""
    return hashlib.sha256(secret).hexdigest()[:8]


class SecretFile:
    """A secret kept in a file (its first line, as bytes), read again when the file changes.

    It is read when made: OSError or ValueError if the file holds no usable secret. Readers
    take `value`, one attribute, and never touch the file; `watch` reads the file again
    every few seconds, off the event loop, so an operator rotates the secret by rewriting
    the file. A file that stops holding a usable secret leaves the last good one in use,
    logged once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value = self._read()
        self._failing = False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretFile) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"SecretFile({str(self.path)!r})"

    def _read(self) -> bytes:
        lines = self.path.read_bytes().splitlines()
        secret = lines[0] if lines else b""
        if not secret:
            raise ValueError("its first line, the secret, is empty")
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(
                f"the secret is {len(secret)} bytes; at least {_MIN_SECRET_BYTES} are needed "
                "(openssl rand -hex 32 makes one)"
            )
        return secret

    def refresh(self) -> bool:
        """Read the file again; True if it holds a new secret, now in use."""
        try:
            secret = self._read()
        except (OSError, ValueError) as exc:
            if not self._failing:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.error("keeping the last good secret of %s: %s", self.path, reason)
                self._failing = True
            return False
        if self._failing:
            log.info("%s holds a usable secret again", self.path)
            self._failing = False
        if secret == self.value:
            return False
        self.value = secret
        log.info("%s holds a new secret (fingerprint %s)", self.path, fingerprint(secret))
        return True

    async def watch(self, interval_s: float = 2.0) -> None:
        """Read the file again every `interval_s`, on a thread (a stalled network volume
        must not stall requests), forever; cancel to stop."""
        failing = False
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                # A watcher that ended would keep the old secret until a restart: it logs
                # once and goes on.
                if not failing:
                    log.exception("the watcher of %s failed; it goes on", self.path)
                failing = True
            else:
                failing = False


def _secret_file(name: str, raw: str) -> SecretFile:
    try:
        return SecretFile(Path(raw))
    except OSError as exc:
        raise ConfigError(f"{name}={raw}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{name}={raw}: {exc}") from None


@dataclass(frozen=True)
class ClientIpSettings:
    """What is kept of the caller's address beside its records (the cafe-client-ip header).

    A key may ask for another mode than the gateway's (`ApiKey.client_ip`); the hash
    secret is then needed for a key that asks for `hashed`, whatever the gateway's mode.
    """

    mode: str = _var(
        "CAFE_CLIENT_IP",
        "full",
        _choice(*CLIENT_IP_MODES),
        "what is kept of the caller's address: full, truncated, hashed or off",
    )
    ipv4_prefix: int = _var(
        "CAFE_CLIENT_IP_IPV4_PREFIX", 24, _integer(0, 32), "truncated: leading bits of IPv4 kept"
    )
    ipv6_prefix: int = _var(
        "CAFE_CLIENT_IP_IPV6_PREFIX", 48, _integer(0, 128), "truncated: leading bits of IPv6 kept"
    )
    # RUF009: as for keys_file below.
    hash_key: SecretFile | None = _var(  # noqa: RUF009
        "CAFE_CLIENT_IP_HASH_KEY_FILE",
        None,
        _secret_file,
        "hashed: file whose first line is the HMAC secret, read again when it changes",
    )

    def __post_init__(self) -> None:
        if self.mode == "hashed" and self.hash_key is None:
            raise ConfigError(
                "CAFE_CLIENT_IP=hashed needs CAFE_CLIENT_IP_HASH_KEY_FILE, a file holding the "
                "secret the addresses are hashed with"
            )


@dataclass(frozen=True)
class Settings:
    """Everything the gateway process is configured with."""

    host: str = _var("CAFE_HOST", "127.0.0.1", _text, "address to listen on")
    port: int = _var("CAFE_PORT", 8080, _integer(0, 65535), "port to listen on")
    workers: int = _var("CAFE_WORKERS", 1, _integer(1, 256), "processes serving the port")
    log_level: str = _var("CAFE_LOG_LEVEL", "INFO", _log_level, "lowest level logged")
    log_format: str = _var(
        "CAFE_LOG_FORMAT", "json", _choice("json", "text"), "json for pipelines, text for people"
    )
    access_log: bool = _var(
        "CAFE_ACCESS_LOG", True, _bool, "a line per request on the gateway.access logger"
    )
    fast_lane: bool = _var(
        "CAFE_FAST_LANE", True, _bool, "serve record POSTs in one function, not the middlewares"
    )
    metrics_port: int | None = _var(
        "CAFE_METRICS_PORT", None, _integer(1, 65535), "serve /metrics here, not beside the API"
    )
    drain_seconds: float = _var(
        "CAFE_DRAIN_SECONDS", 0.0, _seconds, "after SIGTERM, time serving while /readyz says 503"
    )
    shutdown_grace_seconds: float = _var(
        "CAFE_SHUTDOWN_GRACE_SECONDS", 10.0, _seconds, "then, time for requests in flight to end"
    )
    # Covers idle keep-alive connections and headers sent slowly (slow-loris).
    idle_timeout_seconds: float = _var(
        "CAFE_IDLE_TIMEOUT_SECONDS", 15.0, _seconds, "time without a complete request, then close"
    )
    # A slow body holds capacity.
    body_timeout_seconds: float = _var(
        "CAFE_BODY_TIMEOUT_SECONDS", 10.0, _seconds, "time for a request body to arrive, else 408"
    )
    # Each costs a file descriptor and some memory; gateway/http/listener.py answers one past
    # the limit with 503 and closes it.
    max_connections: int = _var(
        "CAFE_MAX_CONNECTIONS", 4096, _integer(1, 1_000_000), "open connections per process"
    )
    # RUF009 sees only a call here (Path is not among its immutable types); _var returns a
    # dataclasses.field like the others, so no default is shared.
    keys_file: Path | None = _var("CAFE_KEYS_FILE", None, _path, "the API-keys file")  # noqa: RUF009
    trusted_proxies: tuple[IPNetwork, ...] = _var(
        "CAFE_TRUSTED_PROXIES", (), _networks, "proxies whose forwarded header is believed"
    )
    # The other header is ignored: a proxy that writes one passes the client's own copy of
    # the other through, so believing it would let a client pick its address.
    forwarded_header: str = _var(
        "CAFE_FORWARDED_HEADER",
        "x-forwarded-for",
        _choice("x-forwarded-for", "forwarded"),
        "the header trusted proxies write the caller's address in",
    )
    max_body_bytes: int = _var(
        "CAFE_MAX_BODY_BYTES", _MAX_BODY_BYTES, _integer(1024, 1 << 30), "largest request body"
    )
    # Parsed records take several times their JSON size, so this bounds memory too.
    max_inflight_bytes: int = _var(
        "CAFE_MAX_INFLIGHT_BYTES",
        _MAX_INFLIGHT_BYTES,
        _integer(1024, 1 << 34),
        "body bytes in progress at once, past which requests are shed with 503",
    )
    # More is a decompression bomb, refused with 413 (as is more than max_body_bytes).
    max_compression_ratio: int = _var(
        "CAFE_MAX_COMPRESSION_RATIO",
        100,
        _integer(1, 100_000),
        "how many times its size a compressed body may decode to",
    )
    # Both compile the same schema files and reject a record for the same violation, in
    # the same words (tests/test_validators.py); jsonschema-rs costs about a third as much
    # per record. fastjsonschema stays the default, as the design names it.
    validator: str = _var(
        "CAFE_VALIDATOR",
        "fastjsonschema",
        _choice("fastjsonschema", "jsonschema-rs"),
        "what validates records; jsonschema-rs is faster (install cafe-gateway[fast])",
    )
    # local: one host's workers share a key's buckets (gateway/limits/local.py); a Redis URL:
    # every gateway that names it does (gateway/limits/fleet.py).
    ratelimit_storage: str = _var(
        "CAFE_RATELIMIT_STORAGE",
        "local",
        _ratelimit_storage,
        "where per-key rate limits are kept: local (per host) or redis://host:port/db (fleet)",
    )
    # 0: no tracing, and the OpenTelemetry SDK is not imported. A client's sampled flag
    # does not force sampling, so the ratio bounds the cost (gateway/tracing.py).
    trace_sample_ratio: float = _var(
        "CAFE_TRACE_SAMPLE_RATIO",
        0.0,
        _ratio,
        "share of requests traced with OpenTelemetry, 0..1 (install cafe-gateway[otel])",
    )
    otlp_endpoint: str = _var(
        "CAFE_OTLP_ENDPOINT",
        "http://127.0.0.1:4318/v1/traces",
        _http_url,
        "where traces are sent: an OTLP/HTTP collector's traces URL",
    )
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    client_ip: ClientIpSettings = field(default_factory=ClientIpSettings)

    def __post_init__(self) -> None:
        """Work out what is derived, and check the rules that tie settings together, so a
        Settings built in code holds to them as one read from the environment does."""
        if isinstance(self.kafka.max_queued_bytes, _Derived):
            queued = queued_bytes(self.max_inflight_bytes, self.max_body_bytes)
            object.__setattr__(self, "kafka", replace(self.kafka, max_queued_bytes=queued))
        if self.workers > 1 and self.port == 0:
            raise ConfigError(f"CAFE_WORKERS={self.workers} needs a fixed CAFE_PORT, not 0")
        # One request queues up to max_body_bytes of records (the body is cut there once
        # decoded, whatever its Content-Encoding, and gateway/http/ingest.py refuses records
        # that come to more as stored), and the queue, unlike admission, has no room for
        # a request alone: a smaller bound would refuse such a request on every try, or,
        # with the spool on, spool it and then fail to replay it (and all behind it) until
        # CAFE_SPOOL_MAX_AGE. The in-flight cap needs no such rule: a request alone in
        # progress is always admitted (gateway/http/admission.py).
        queued = self.kafka.max_queued_bytes
        if queued < self.max_inflight_bytes:
            raise ConfigError(
                f"CAFE_MAX_QUEUED_BYTES={queued} is below "
                f"CAFE_MAX_INFLIGHT_BYTES={self.max_inflight_bytes}: the requests "
                "admitted at once could not all be queued"
            )
        if queued < self.max_body_bytes:
            raise ConfigError(
                f"CAFE_MAX_QUEUED_BYTES={queued} is below "
                f"CAFE_MAX_BODY_BYTES={self.max_body_bytes}: a request of the largest "
                "body would be refused on every try"
            )
        spool = self.spool
        if spool.dir is not None and spool.after_ms >= self.kafka.produce_timeout_ms:
            raise ConfigError(
                f"CAFE_SPOOL_AFTER_MS={spool.after_ms} is not below "
                f"CAFE_PRODUCE_TIMEOUT_MS={self.kafka.produce_timeout_ms}: records would "
                "never be spooled before Kafka's wait ends"
            )
        if self.kafka.client == "librdkafka":
            if self.kafka.security.sasl_mechanism == "OAUTHBEARER":
                raise ConfigError(
                    "CAFE_KAFKA_CLIENT=librdkafka does not support "
                    "CAFE_KAFKA_SASL_MECHANISM=OAUTHBEARER (token files, token commands, "
                    "MSK IAM): use CAFE_KAFKA_CLIENT=aiokafka"
                )
            if importlib.util.find_spec("confluent_kafka") is None:
                raise ConfigError(
                    "CAFE_KAFKA_CLIENT=librdkafka needs confluent-kafka: "
                    "pip install 'cafe-gateway[librdkafka]'"
                )
        if self.trace_sample_ratio > 0 and not _installed(*_OTEL_MODULES):
            raise ConfigError(
                f"CAFE_TRACE_SAMPLE_RATIO={self.trace_sample_ratio:g} needs the OpenTelemetry "
                "SDK and its OTLP exporter, an extra of the gateway: "
                "pip install 'cafe-gateway[otel]'"
            )
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ConfigError(
                f"CAFE_METRICS_PORT={self.metrics_port} is CAFE_PORT; unset it to serve "
                "/metrics on the main port"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read every declared `CAFE_*` variable; unset or blank ones keep their defaults.
        Also checks the files and programs the Kafka security settings name."""
        settings = _read(cls(), env)
        settings.kafka.security.check()
        return settings


def declared_variables() -> list[tuple[Variable[Any], Any]]:
    """Each declared variable with the default it is declared with, in declaration order."""
    return list(_declared(Settings()))


def _declared(defaults: DataclassInstance) -> Iterator[tuple[Variable[Any], Any]]:
    for f in fields(defaults):
        if _VARIABLE in f.metadata:
            # The field's own default, whatever made `defaults`: the test suite makes its
            # Settings() validate with CAFE_VALIDATOR (tests/conftest.py).
            yield f.metadata[_VARIABLE], f.default
        else:
            yield from _declared(getattr(defaults, f.name))


def _read(defaults: _D, env: Mapping[str, str]) -> _D:
    """`defaults` with the value of each declared variable that is set; nested settings too."""
    changes: dict[str, Any] = {}
    for f in fields(defaults):
        variable = f.metadata.get(_VARIABLE)
        if variable is None:
            # Nested settings. A plain field declared without _var fails here, in fields().
            changes[f.name] = _read(getattr(defaults, f.name), env)
            continue
        raw = env.get(variable.name, "").strip()
        if raw:
            changes[f.name] = variable.parse(variable.name, raw)
    return replace(defaults, **changes)
