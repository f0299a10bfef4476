"""Connecting to a secured Kafka, without a broker: the settings refused at start, the
client options and the secrets read again, the token sources, and a failed connection
put in words (against real TLS servers on loopback)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from aiokafka import errors
from prometheus_client import CollectorRegistry

from gateway.config import ConfigError, KafkaSettings, Settings
from gateway.kafka.auth import (
    CommandToken,
    FileToken,
    KafkaAuth,
    MskIamToken,
    SecretUnavailable,
    explain,
)
from gateway.kafka.sink import KafkaSink
from gateway.logs import BootstrapFailures
from gateway.metrics import Metrics


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """A CA bundle, a client certificate and key, and a password file."""
    client = ca.issue_cert("gateway")
    paths = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "client.pem",
        "key": tmp_path / "client.key",
        "password": tmp_path / "password",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    client.private_key_pem.write_to_path(str(paths["key"]))
    paths["password"].write_text("s3cret\n")
    return paths


def _env(**variables: str | Path) -> dict[str, str]:
    return {f"CAFE_KAFKA_{name}": str(value) for name, value in variables.items()}


SASL_SSL = {"SECURITY_PROTOCOL": "SASL_SSL"}


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"SECURITY_PROTOCOL": "SASL_SSL"}, "CAFE_KAFKA_SASL_MECHANISM"),
        ({"SECURITY_PROTOCOL": "TLS"}, "CAFE_KAFKA_SECURITY_PROTOCOL"),
        ({"SASL_MECHANISM": "PLAIN"}, "CAFE_KAFKA_SASL_MECHANISM"),
        ({"SSL_CHECK_HOSTNAME": "false"}, "CAFE_KAFKA_SSL_CHECK_HOSTNAME"),
        ({**SASL_SSL, "SASL_MECHANISM": "GSSAPI"}, "CAFE_KAFKA_SASL_MECHANISM"),
        ({**SASL_SSL, "SASL_MECHANISM": "SCRAM-SHA-512"}, "CAFE_KAFKA_SASL_USERNAME"),
        (
            {**SASL_SSL, "SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "u"},
            "CAFE_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {**SASL_SSL, "SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "u", "SASL_PASSWORD": "p"}
            | {"SASL_PASSWORD_FILE": "/etc/hostname"},
            "CAFE_KAFKA_SASL_PASSWORD",
        ),
        ({**SASL_SSL, "SASL_MECHANISM": "OAUTHBEARER"}, "CAFE_KAFKA_OAUTH_TOKEN_FILE"),
        (
            {**SASL_SSL, "SASL_MECHANISM": "OAUTHBEARER", "OAUTH_TOKEN_COMMAND": "true"}
            | {"OAUTH_TOKEN_FILE": "/etc/hostname"},
            "CAFE_KAFKA_OAUTH_TOKEN_COMMAND",
        ),
        (
            {**SASL_SSL, "SASL_MECHANISM": "OAUTHBEARER", "MSK_IAM_REGION": "eu-west-1"},
            "cafe-gateway[msk]",
        ),
        ({"SECURITY_PROTOCOL": "SSL", "SSL_CA_FILE": "/nonexistent.pem"}, "/nonexistent.pem"),
        (
            {**SASL_SSL, "SASL_MECHANISM": "OAUTHBEARER", "OAUTH_TOKEN_COMMAND": "get 'token"},
            "CAFE_KAFKA_OAUTH_TOKEN_COMMAND cannot be split",
        ),
        (
            {**SASL_SSL, "SASL_MECHANISM": "OAUTHBEARER", "OAUTH_TOKEN_COMMAND": "no-such-tool x"},
            "CAFE_KAFKA_OAUTH_TOKEN_COMMAND: no program",
        ),
        ({"SECURITY_PROTOCOL": "SSL", "SSL_KEY_FILE": "/etc/hostname"}, "SSL_CERT_FILE"),
        ({"SSL_KEY_PASSWORD_FILE": "/etc/hostname"}, "CAFE_KAFKA_SSL_KEY_PASSWORD_FILE"),
        (
            {**SASL_SSL, "SASL_MECHANISM": "OAUTHBEARER", "OAUTH_TOKEN_COMMAND": "true"}
            | {"SASL_USERNAME": "gw"},
            "CAFE_KAFKA_SASL_USERNAME is set, but",
        ),
        (
            {**SASL_SSL, "SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "u", "SASL_PASSWORD": "p"}
            | {"OAUTH_TOKEN_FILE": "/etc/hostname"},
            "CAFE_KAFKA_OAUTH_TOKEN_FILE is set, but",
        ),
        ({"SECURITY_PROTOCOL": "SSL", "SSL_CA_FILE": "/etc/hostname"}, "SSL_CA_FILE"),
    ],
)
def test_a_combination_that_cannot_connect_stops_start_up(
    variables: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        Settings.from_env(_env(**variables))


def test_a_password_given_in_the_environment_is_never_shown(files: dict[str, Path]) -> None:
    settings = Settings.from_env(
        _env(**SASL_SSL, SASL_MECHANISM="PLAIN", SASL_USERNAME="gw", SASL_PASSWORD="hunter2")
    )
    assert settings.kafka.security.sasl_password is not None
    assert settings.kafka.security.sasl_password.value == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.kafka.security.sasl_password)


def test_the_client_options_read_the_password_file_at_each_new_client(
    files: dict[str, Path],
) -> None:
    settings = Settings.from_env(
        _env(
            **SASL_SSL,
            SASL_MECHANISM="SCRAM-SHA-512",
            SASL_USERNAME="gateway",
            SASL_PASSWORD_FILE=files["password"],
            SSL_CA_FILE=files["ca"],
        )
    )
    auth = KafkaAuth(settings.kafka)
    options = auth.options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("gateway", "s3cret")
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].check_hostname
    files["password"].write_text("rotated\n")
    assert auth.options()["sasl_plain_password"] == "rotated"
    files["password"].unlink()
    with pytest.raises(SecretUnavailable, match="CAFE_KAFKA_SASL_PASSWORD_FILE"):
        auth.options()


def test_a_plaintext_client_gets_no_tls_and_no_sasl() -> None:
    assert KafkaAuth(KafkaSettings()).options() == {"security_protocol": "PLAINTEXT"}


def test_mutual_tls_loads_the_client_certificate(files: dict[str, Path]) -> None:
    settings = Settings.from_env(
        _env(
            SECURITY_PROTOCOL="SSL",
            SSL_CA_FILE=files["ca"],
            SSL_CERT_FILE=files["cert"],
            SSL_KEY_FILE=files["key"],
            SSL_CHECK_HOSTNAME="false",
        )
    )
    context = KafkaAuth(settings.kafka).options()["ssl_context"]
    assert not context.check_hostname
    # The CA given is the only one trusted (not the system's as well).
    assert len(context.get_ca_certs()) == 1


def test_a_key_that_does_not_match_its_certificate_stops_start_up(
    files: dict[str, Path], ca: trustme.CA
) -> None:
    ca.issue_cert("other").private_key_pem.write_to_path(str(files["key"]))
    with pytest.raises(ConfigError, match="CAFE_KAFKA_SSL_CERT_FILE"):
        Settings.from_env(
            _env(SECURITY_PROTOCOL="SSL", SSL_CERT_FILE=files["cert"], SSL_KEY_FILE=files["key"])
        )


def _jwt(**claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}."


async def test_a_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    tokens = FileToken(path)
    assert await tokens.token() == "first"
    path.write_text("second-and-longer\n")
    assert await tokens.token() == "second-and-longer"
    path.unlink()
    with pytest.raises(SecretUnavailable, match="CAFE_KAFKA_OAUTH_TOKEN_FILE"):
        await tokens.token()


async def test_a_token_command_runs_again_once_most_of_the_lifetime_has_passed(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    script = tmp_path / "token.py"
    # Each run adds an x to `runs`, and prints the token it is given.
    script.write_text(
        "import pathlib, sys\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "runs.write_text((runs.read_text() if runs.exists() else '') + 'x')\n"
        "print(sys.argv[1])\n"
    )
    token = _jwt(sub="gateway", exp=time.time() + 100)
    tokens = CommandToken(f"{sys.executable} {script} {token}")
    assert await tokens.token() == token
    assert await tokens.token() == token
    assert runs.read_text() == "x"  # kept: less than 80% of its lifetime has passed
    tokens._renew_at = time.time() - 1  # as if 80 s had passed
    await tokens.token()
    assert runs.read_text() == "xx"


async def test_a_failing_token_command_is_named_but_what_it_said_is_not_repeated() -> None:
    # A token endpoint's error may quote the client secret, and /readyz answers anyone.
    said = "401 from https://idp/token?client_secret=hunter2"
    tokens = CommandToken(f"{sys.executable} -c \"import sys; sys.exit('{said}')\"")
    with pytest.raises(SecretUnavailable, match=r"status 1$") as refused:
        await tokens.token()
    assert "hunter2" not in str(refused.value)


async def test_a_token_command_that_is_gone_or_prints_no_token_is_a_secret_unavailable(
    tmp_path: Path,
) -> None:
    gone = CommandToken(str(tmp_path / "no-such-program"))
    with pytest.raises(SecretUnavailable, match="could not be run"):
        await gone.token()
    binary = CommandToken(f"{sys.executable} -c \"import sys; sys.stdout.buffer.write(b'\\xff')\"")
    with pytest.raises(SecretUnavailable, match="not a token"):
        await binary.token()


async def test_msk_iam_tokens_come_from_the_signer_and_are_kept_until_near_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def generate_auth_token(region: str) -> tuple[str, int]:
        calls.append(region)
        return f"signed-{len(calls)}", int((time.time() + 900) * 1000)

    signer = types.ModuleType("aws_msk_iam_sasl_signer.MSKAuthTokenProvider")
    signer.generate_auth_token = generate_auth_token  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", types.ModuleType("signer"))
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer.MSKAuthTokenProvider", signer)
    tokens = MskIamToken("eu-west-1")
    assert [await tokens.token(), await tokens.token()] == ["signed-1", "signed-1"]
    assert calls == ["eu-west-1"]


SECURITY = Settings.from_env(
    _env(**SASL_SSL, SASL_MECHANISM="SCRAM-SHA-512", SASL_USERNAME="gw", SASL_PASSWORD="p")
).kafka.security


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (errors.SaslAuthenticationFailed("Authentication failed"), "sasl_authentication"),
        (errors.UnsupportedSaslMechanismError("not enabled"), "sasl_mechanism"),
        (errors.IllegalSaslStateError("not a SASL listener"), "sasl_mechanism"),
        (errors.ClusterAuthorizationFailedError(), "not_authorized"),
        (ConnectionRefusedError(111, "Connection refused"), "unreachable"),
        (TimeoutError(), "unreachable"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls"),
        (
            SecretUnavailable("CAFE_KAFKA_SASL_PASSWORD_FILE=/x cannot be read"),
            "secret_unavailable",
        ),
        (errors.KafkaConnectionError("Connection at 127.0.0.1:9093 closed"), "refused"),
    ],
)
def test_each_failure_is_explained_by_its_cause(error: BaseException, cause: str) -> None:
    problem = explain(error, "127.0.0.1:9093", SECURITY)
    assert problem.cause == cause
    assert "127.0.0.1:9093" in problem.words or cause == "secret_unavailable"


def test_a_cause_chained_under_a_closed_connection_is_the_one_explained() -> None:
    closed = errors.KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    closed.__cause__ = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")
    closed.__cause__.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert explain(closed, "127.0.0.1:9093", SECURITY).cause == "tls_client_certificate"


@contextlib.asynccontextmanager
async def _tls_server(context: ssl.SSLContext) -> AsyncIterator[str]:
    """A TLS server on loopback that closes each connection after its handshake."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=context)
    async with server:
        yield f"localhost:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
def server_context(ca: trustme.CA) -> Iterator[ssl.SSLContext]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    yield context


def _ssl_settings(bootstrap: str, ca_file: Path) -> KafkaSettings:
    env = _env(SECURITY_PROTOCOL="SSL", SSL_CA_FILE=ca_file, BOOTSTRAP=bootstrap)
    return Settings.from_env(env).kafka


@pytest.fixture
def bootstrap_failures_filtered() -> Iterator[None]:
    """aiokafka's own line per failed try, demoted as setup_logging demotes it."""
    aiokafka_log = logging.getLogger("aiokafka")
    demote = BootstrapFailures()
    aiokafka_log.addFilter(demote)
    yield
    aiokafka_log.removeFilter(demote)


@pytest.mark.usefixtures("bootstrap_failures_filtered")
async def test_a_broker_certificate_from_an_unknown_ca_makes_the_gateway_not_ready_and_says_why(
    tmp_path: Path, server_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    registry = CollectorRegistry()
    async with _tls_server(server_context) as bootstrap:
        sink = KafkaSink(_ssl_settings(bootstrap, other), Metrics(registry, "test"))
        await sink.start()
        try:
            for _ in range(100):
                if sink.health.problem is not None:
                    break
                await asyncio.sleep(0.05)
            assert sink.health.problem is not None
            assert sink.health.problem.cause == "tls_untrusted"
            reason = await sink.unavailable()
            assert reason is not None
            assert "not signed by a CA in" in reason and str(other) in reason
            value = registry.get_sample_value(
                "cafe_kafka_connection_problem", {"cause": "tls_untrusted"}
            )
            assert value == 1
            errors_logged = [r for r in caplog.records if r.levelname == "ERROR"]
            assert len(errors_logged) == 1, [r.getMessage() for r in errors_logged]
            assert "CAFE_KAFKA_SSL_CA_FILE" in errors_logged[0].getMessage()
        finally:
            await sink.close()


async def test_a_trusted_broker_that_is_not_kafka_is_not_a_tls_problem(
    tmp_path: Path, server_context: ssl.SSLContext, ca: trustme.CA
) -> None:
    trusted = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(trusted))
    async with _tls_server(server_context) as bootstrap:
        problem = await KafkaAuth(_ssl_settings(bootstrap, trusted)).diagnose()
    assert problem is not None
    assert problem.cause == "refused"


async def test_a_cause_to_fix_is_told_before_a_server_that_is_merely_away(
    tmp_path: Path, server_context: ssl.SSLContext
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with _tls_server(server_context) as listening:
        # The first bootstrap server is not there; the second's certificate is untrusted.
        problem = await KafkaAuth(_ssl_settings(f"127.0.0.1:1,{listening}", other)).diagnose()
    assert problem is not None
    assert problem.cause == "tls_untrusted"
