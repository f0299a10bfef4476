"""How the gateway connects to a secured Kafka: the client's TLS and SASL options, where
OAUTHBEARER tokens come from, and a refused connection put in words a person can act on.

Files (CA bundle, client certificate, password, token) are read again for each new
client, so a rotated secret takes effect at the next connection, without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import logging
import shlex
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import errors
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import create_conn

from gateway.config import ConfigError, KafkaSecurity, KafkaSettings, first_line

log = logging.getLogger(__name__)

# A token is fetched again once this share of its lifetime has passed, and a token
# whose expiry is unknown (not a JWT) is kept this long.
_REFRESH_AT = 0.8
_UNKNOWN_LIFETIME_S = 300.0
_COMMAND_TIMEOUT_S = 30.0
# How long one diagnosing connection may take (the sink waits at least 2 s for them all).
_TRY_S = 1.5


class KafkaAuth:
    """The options each new Kafka client of the gateway is made with."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        security = settings.security
        self._tokens: AbstractTokenProvider | None = None
        if security.sasl_mechanism == "OAUTHBEARER":
            self._tokens = token_provider(security)
        if security.protocol in ("SSL", "SASL_SSL") and not security.check_hostname:
            log.warning(
                "CAFE_KAFKA_SSL_CHECK_HOSTNAME is off: any certificate a trusted CA signed "
                "passes for any broker"
            )

    def options(self) -> dict[str, Any]:
        """aiokafka's connection options for a producer or an admin client, the files
        read now; SecretUnavailable if one cannot be."""
        security = self._settings.security
        options: dict[str, Any] = {"security_protocol": security.protocol}
        if security.protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = ssl_context(security)
        if security.sasl_mechanism is not None:
            options["sasl_mechanism"] = security.sasl_mechanism
        if self._tokens is not None:
            options["sasl_oauth_token_provider"] = self._tokens
        elif security.sasl_mechanism is not None:
            options["sasl_plain_username"] = security.sasl_username
            options["sasl_plain_password"] = _password(security)
        return options

    async def diagnose(self) -> Problem | None:
        """Connect to every bootstrap server at once, as the producer would: None if one
        takes the connection, else why not; a cause to fix (credentials, TLS) before a
        server that is merely away."""
        servers = [server.strip() for server in self._settings.bootstrap.split(",")]
        problems = await asyncio.gather(*(self._try(server) for server in servers))
        if any(problem is None for problem in problems):
            return None
        found = [problem for problem in problems if problem is not None]
        return next((p for p in found if p.cause != "unreachable"), found[0])

    async def _try(self, server: str) -> Problem | None:
        settings = self._settings
        host, _, port = server.rpartition(":")
        try:
            # Bounded on its own: a server that drops packets must not keep the others'
            # answers from being told.
            async with asyncio.timeout(_TRY_S):
                conn = await create_conn(
                    host.strip("[]"),
                    int(port),
                    client_id=settings.client_id,
                    request_timeout_ms=settings.request_timeout_ms,
                    **self.options(),
                )
        except (OSError, TimeoutError, errors.KafkaError) as exc:
            return explain(exc, server, settings.security)
        conn.close()
        return None


@dataclass(frozen=True)
class Problem:
    """Why the gateway cannot connect to Kafka: a metric label, and a sentence."""

    cause: str
    words: str


class SecretUnavailable(errors.KafkaError):  # type: ignore[misc]  # aiokafka is untyped
    """A file the connection needs cannot be read, or no OAUTHBEARER token came."""


def explain(exc: BaseException, server: str, security: KafkaSecurity) -> Problem:
    """Put a failed connection in words that say what to check. aiokafka reports a
    connection closed under it with the cause chained: the first link that says more
    than "closed" is the one explained."""
    link: BaseException | None = exc
    while link is not None:
        problem = _explain(link, f"Kafka at {server}", security)
        if problem is not None:
            return problem
        link = link.__cause__
    return Problem(
        "refused",
        f"Kafka at {server} closed the connection while it was set up ({exc}): does its "
        f"listener take CAFE_KAFKA_SECURITY_PROTOCOL={security.protocol}?",
    )


def explain_refusal(exc: BaseException, server: str, security: KafkaSecurity) -> Problem | None:
    """A refusal that came once connected (the connection itself was fine), in words;
    None if `exc` is not one of those."""
    if isinstance(exc, errors.ClusterAuthorizationFailedError):
        return _explain(exc, f"Kafka at {server}", security)
    return None


def _explain(exc: BaseException, at: str, security: KafkaSecurity) -> Problem | None:
    if isinstance(exc, SecretUnavailable):
        return Problem("secret_unavailable", str(exc))
    if isinstance(exc, errors.IllegalSaslStateError):
        return Problem(
            "sasl_mechanism",
            f"{at} did not take a SASL login on this listener ({exc}): does it take "
            f"CAFE_KAFKA_SECURITY_PROTOCOL={security.protocol}?",
        )
    if isinstance(exc, errors.SaslAuthenticationFailed):
        who = security.sasl_username or "the token's subject"
        return Problem(
            "sasl_authentication",
            f"{at} refused the gateway's {security.sasl_mechanism} credentials for {who}: "
            f"check CAFE_KAFKA_SASL_USERNAME and the password or token ({exc})",
        )
    if isinstance(exc, errors.ClusterAuthorizationFailedError):
        # An idempotent producer's id needs Write on some topic (or, before Kafka 3.0,
        # IdempotentWrite on the cluster).
        return Problem(
            "not_authorized",
            f"{at} took the gateway's credentials but lets it write to no topic "
            f"(CLUSTER_AUTHORIZATION_FAILED): grant its principal Write and Describe on "
            f"its topics",
        )
    if isinstance(exc, errors.UnsupportedSaslMechanismError):
        return Problem(
            "sasl_mechanism",
            f"{at} does not offer CAFE_KAFKA_SASL_MECHANISM={security.sasl_mechanism} on "
            f"this listener ({exc})",
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == _HOSTNAME_MISMATCH:
            return Problem(
                "tls_hostname",
                f"the certificate of {at} does not name that host ({exc.verify_message}): "
                "connect by a name it holds",
            )
        trusted = security.ca_file or "the system's CA bundle"
        return Problem(
            "tls_untrusted",
            f"the certificate of {at} is not signed by a CA in {trusted} "
            f"({exc.verify_message}): set CAFE_KAFKA_SSL_CA_FILE to the cluster's CA",
        )
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or str(exc)
        if any(alert in reason.upper() for alert in _CLIENT_CERT_REFUSED):
            return Problem(
                "tls_client_certificate",
                f"{at} refused the gateway's client certificate ({reason}): check "
                "CAFE_KAFKA_SSL_CERT_FILE and CAFE_KAFKA_SSL_KEY_FILE",
            )
        return Problem(
            "tls",
            f"TLS with {at} failed ({reason}): does its listener take "
            f"CAFE_KAFKA_SECURITY_PROTOCOL={security.protocol}?",
        )
    if isinstance(exc, TimeoutError | errors.KafkaTimeoutError):
        return Problem("unreachable", f"{at} did not answer in time")
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return Problem("unreachable", f"{at} is not reachable ({exc.strerror or exc})")
    return None


# X509_V_ERR_HOSTNAME_MISMATCH, in OpenSSL's x509_vfy.h.
_HOSTNAME_MISMATCH = 62
# TLS alerts a server sends when it refuses the client's certificate, or has none.
_CLIENT_CERT_REFUSED = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "UNKNOWN_CA",
)


def ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """The client TLS context of `security` (`KafkaSecurity.tls_context`), its files read
    now; SecretUnavailable, naming the variable, if one cannot be used."""
    try:
        return security.tls_context()
    except ConfigError as exc:
        raise SecretUnavailable(str(exc)) from exc


def _password(security: KafkaSecurity) -> str | None:
    path = security.sasl_password_file
    if path is None:
        return security.sasl_password.value if security.sasl_password is not None else None
    try:
        return first_line(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretUnavailable(
            f"CAFE_KAFKA_SASL_PASSWORD_FILE={path} cannot be read now: {exc}"
        ) from exc


def token_provider(security: KafkaSecurity) -> AbstractTokenProvider:
    """The OAUTHBEARER token source the settings name (KafkaSecurity.check: exactly one)."""
    if security.oauth_token_file is not None:
        return FileToken(security.oauth_token_file)
    if security.oauth_token_command is not None:
        return CommandToken(security.oauth_token_command)
    if security.msk_iam_region is not None:
        return MskIamToken(security.msk_iam_region)
    raise ValueError("OAUTHBEARER without a token source (KafkaSecurity.check refuses that)")


class FileToken(AbstractTokenProvider):  # type: ignore[misc]
    """A token kept in a file by something else (a sidecar, a Kubernetes projected
    volume); read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    async def token(self) -> str:
        try:
            stat = self._path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._token = self._path.read_text().strip()
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretUnavailable(
                f"CAFE_KAFKA_OAUTH_TOKEN_FILE={self._path} cannot be read now: {exc}"
            ) from exc
        return self._token


class CommandToken(AbstractTokenProvider):  # type: ignore[misc]
    """A token printed by a command (no shell), run again once most of its lifetime has
    passed: the JWT's `exp` says how long that is."""

    def __init__(self, command: str) -> None:
        self._argv = shlex.split(command)
        self._token = ""
        self._renew_at = 0.0

    async def token(self) -> str:
        if time.time() >= self._renew_at:
            self._token = await self._run()
            self._renew_at = _renew_at(self._token)
        return self._token

    async def _run(self) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            raise SecretUnavailable(
                f"CAFE_KAFKA_OAUTH_TOKEN_COMMAND could not be run: {exc.strerror or exc}"
            ) from exc
        try:
            async with asyncio.timeout(_COMMAND_TIMEOUT_S):
                out, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise SecretUnavailable(
                f"CAFE_KAFKA_OAUTH_TOKEN_COMMAND did not finish in {_COMMAND_TIMEOUT_S:g}s"
            ) from None
        # What it says on stderr is not repeated: a token endpoint's error may quote a
        # client secret, and /readyz is answered to anyone. Run it by hand to see.
        if process.returncode != 0:
            raise SecretUnavailable(
                f"CAFE_KAFKA_OAUTH_TOKEN_COMMAND exited with status {process.returncode}"
            )
        try:
            return out.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SecretUnavailable(
                "CAFE_KAFKA_OAUTH_TOKEN_COMMAND printed something that is not a token"
            ) from None


def _renew_at(token: str) -> float:
    """When to fetch a token again: most of the way to its JWT `exp`, or a fixed while
    from now if it is not a JWT with one."""
    now = time.time()
    expires = _jwt_expiry(token)
    if expires is None or expires <= now:
        return now + _UNKNOWN_LIFETIME_S if expires is None else now
    return now + (expires - now) * _REFRESH_AT


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (not checked: the broker checks it), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    expires = claims.get("exp") if isinstance(claims, dict) else None
    return float(expires) if isinstance(expires, int | float) else None


class MskIamToken(AbstractTokenProvider):  # type: ignore[misc]
    """Amazon MSK's IAM tokens, signed with the process's AWS credentials by
    aws-msk-iam-sasl-signer-python (the `msk` extra)."""

    def __init__(self, region: str) -> None:
        self._region = region
        self._signer = importlib.import_module("aws_msk_iam_sasl_signer.MSKAuthTokenProvider")
        self._token = ""
        self._renew_at = 0.0

    async def token(self) -> str:
        if time.time() >= self._renew_at:
            try:
                # It resolves credentials with botocore, which may do blocking I/O.
                token, expiry_ms = await asyncio.get_running_loop().run_in_executor(
                    None, self._signer.generate_auth_token, self._region
                )
            except Exception as exc:  # botocore's errors (no credentials, ...) are its own
                raise SecretUnavailable(
                    f"no Amazon MSK IAM token for {self._region}: {type(exc).__name__}"
                ) from exc
            now = time.time()
            self._token = token
            self._renew_at = now + (expiry_ms / 1000 - now) * _REFRESH_AT
        return self._token
