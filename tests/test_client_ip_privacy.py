"""What is kept of the caller's address beside its records: CAFE_CLIENT_IP's modes, their
prefixes and hash secret, a key's own mode, and how the CLI and the keys file hold it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import replace
from pathlib import Path
from unittest import mock

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from devkit.samples import curl_bodies
from gateway.cli import main
from gateway.config import ClientIpSettings, ConfigError, SecretFile, Settings
from gateway.http.clientip import kept_client_ip
from gateway.keys.file import read_keys_file, write_keys_file
from gateway.keys.model import ApiKey, KeysFileError, mint_key, rotate_key
from gateway.keys.store import KeyStore
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings, produced
from tests.support.keys import KeyFile
from tests.support.wait import eventually

IPV4 = "203.0.113.9"
IPV6 = "2001:db8:1:2::7"
MAPPED = "::ffff:203.0.113.9"
# Each peer the socket may give, and the address as client_ip shows it.
PEERS = [(IPV4, IPV4), (IPV6, IPV6), (MAPPED, IPV4), (None, "unknown")]


def _request(peer: str | None, headers: dict[str, str] | None = None) -> object:
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 4711) if peer else None
    return make_mocked_request(
        "POST", "/v1/activity", headers=CIMultiDict(headers or {}), transport=transport
    )


def _key(client_ip: str | None = None) -> ApiKey:
    _, record = mint_key(("web",))
    return replace(record, client_ip=client_ip)


def _kept(peer: str | None, client_ip: ClientIpSettings, key: ApiKey | None = None) -> str | None:
    settings = Settings(client_ip=client_ip)
    return kept_client_ip(_request(peer), settings, key or _key())  # type: ignore[arg-type]


def _write_secret(path: Path, secret: bytes | None = None) -> bytes:
    """A new random secret written to `path` (as an editor would: with a line end)."""
    secret = secret if secret is not None else secrets.token_hex(32).encode()
    path.write_bytes(secret + b"\n")
    return secret


def _expected_hash(secret: bytes, address: str) -> str:
    """The hashed form, worked out here from the documented rule, not by the gateway."""
    digest = hmac.new(secret, address.encode(), hashlib.sha256).hexdigest()
    return f"{hashlib.sha256(secret).hexdigest()[:8]}:{digest}"


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "client-ip-key"
    _write_secret(path)
    return path


# Each mode on each kind of address.


@pytest.mark.parametrize(("peer", "shown"), PEERS)
def test_full_keeps_the_address_as_client_ip_shows_it(peer: str | None, shown: str) -> None:
    assert _kept(peer, ClientIpSettings()) == shown
    assert _kept(peer, ClientIpSettings(mode="full")) == shown


@pytest.mark.parametrize(
    ("peer", "kept"),
    [(IPV4, "203.0.113.0"), (IPV6, "2001:db8:1::"), (MAPPED, "203.0.113.0"), (None, "unknown")],
)
def test_truncated_keeps_the_network_as_an_address(peer: str | None, kept: str) -> None:
    assert _kept(peer, ClientIpSettings(mode="truncated")) == kept


@pytest.mark.parametrize(("peer", "shown"), PEERS)
def test_hashed_keeps_the_hmac_of_the_address(
    secret_path: Path, peer: str | None, shown: str
) -> None:
    secret = secret_path.read_bytes().rstrip(b"\n")
    kept = _kept(peer, ClientIpSettings(mode="hashed", hash_key=SecretFile(secret_path)))
    if shown == "unknown":
        assert kept == "unknown"
        return
    assert kept == _expected_hash(secret, shown)
    assert kept is not None and shown not in kept


def test_hashed_known_answer(tmp_path: Path) -> None:
    # Worked out with: printf '%s' 192.0.2.1 | openssl dgst -sha256 -hmac 0123456789abcdef
    # and: printf '%s' 0123456789abcdef | sha256sum
    path = tmp_path / "key"
    _write_secret(path, b"0123456789abcdef")
    expected = "9f9f5111:834648f6724c306a07b6ce902bc2c10ed42aa5edeb134513c40d1f957e4343f0"
    assert _expected_hash(b"0123456789abcdef", "192.0.2.1") == expected
    kept = _kept("192.0.2.1", ClientIpSettings(mode="hashed", hash_key=SecretFile(path)))
    assert kept == expected
    fingerprint, _, digest = expected.partition(":")
    assert len(fingerprint) == 8 and len(digest) == 64 and digest == digest.lower()


@pytest.mark.parametrize(("peer", "shown"), PEERS)
def test_off_keeps_nothing(peer: str | None, shown: str) -> None:
    assert _kept(peer, ClientIpSettings(mode="off")) is None


@pytest.mark.parametrize(
    ("ipv4_prefix", "ipv6_prefix", "peer", "kept"),
    [
        (16, 48, IPV4, "203.0.0.0"),
        (32, 48, IPV4, IPV4),
        (0, 48, IPV4, "0.0.0.0"),  # noqa: S104 - an address kept, not one bound
        (24, 64, IPV6, "2001:db8:1:2::"),
        (24, 32, IPV6, "2001:db8::"),
        (24, 128, IPV6, IPV6),
        (8, 48, MAPPED, "203.0.0.0"),
    ],
)
def test_the_prefixes_say_how_much_is_kept(
    ipv4_prefix: int, ipv6_prefix: int, peer: str, kept: str
) -> None:
    settings = ClientIpSettings(mode="truncated", ipv4_prefix=ipv4_prefix, ipv6_prefix=ipv6_prefix)
    assert _kept(peer, settings) == kept


def test_a_trusted_proxys_word_is_what_is_truncated() -> None:
    settings = Settings(
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
        client_ip=ClientIpSettings(mode="truncated"),
    )
    request = _request("10.0.0.2", {"X-Forwarded-For": "198.51.100.7"})
    assert kept_client_ip(request, settings, _key()) == "198.51.100.0"  # type: ignore[arg-type]


# The hash secret: read off the request path, rotated without a restart, cached per secret.


def test_no_file_is_read_to_keep_an_address(secret_path: Path) -> None:
    settings = ClientIpSettings(mode="hashed", hash_key=SecretFile(secret_path))
    with (
        mock.patch.object(Path, "read_bytes", side_effect=AssertionError("read a file")),
        mock.patch("builtins.open", side_effect=AssertionError("opened a file")),
    ):
        assert _kept(IPV4, settings) is not None


def test_the_hmac_is_worked_out_once_per_address_and_secret(secret_path: Path) -> None:
    hash_key = SecretFile(secret_path)
    settings = ClientIpSettings(mode="hashed", hash_key=hash_key)
    with mock.patch("hmac.new", wraps=hmac.new) as worked_out:
        first = [_kept(peer, settings) for peer in (IPV4, IPV6, IPV4, IPV6, MAPPED)]
        assert worked_out.call_count == 2
        assert first[0] == first[2] == first[4] and first[1] == first[3]
        # A new secret: worked out again, and the old results are not served.
        new = _write_secret(secret_path)
        assert hash_key.refresh() is True
        second = [_kept(peer, settings) for peer in (IPV4, IPV4)]
        assert worked_out.call_count == 3
    assert second == [_expected_hash(new, IPV4)] * 2
    assert second[0] != first[0]


def test_a_rotated_secret_is_used_once_read_again(secret_path: Path) -> None:
    old = secret_path.read_bytes().rstrip(b"\n")
    hash_key = SecretFile(secret_path)
    settings = ClientIpSettings(mode="hashed", hash_key=hash_key)
    assert _kept(IPV4, settings) == _expected_hash(old, IPV4)
    new = _write_secret(secret_path)
    # Until the watcher reads the file, the secret in memory is used: no I/O per request.
    assert _kept(IPV4, settings) == _expected_hash(old, IPV4)
    assert hash_key.refresh() is True
    assert _kept(IPV4, settings) == _expected_hash(new, IPV4)
    assert hash_key.refresh() is False  # unchanged
    # Back to the old secret: the old values again, not the last ones cached.
    _write_secret(secret_path, old)
    assert hash_key.refresh() is True
    assert _kept(IPV4, settings) == _expected_hash(old, IPV4)


@pytest.mark.parametrize(
    "content", [None, b"", b"\n", b"short\n"], ids=["gone", "empty", "blank", "short"]
)
def test_a_broken_rotation_keeps_the_last_good_secret(
    secret_path: Path, caplog: pytest.LogCaptureFixture, content: bytes | None
) -> None:
    good = secret_path.read_bytes().rstrip(b"\n")
    hash_key = SecretFile(secret_path)
    if content is None:
        secret_path.unlink()
    else:
        secret_path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="gateway.config"):
        assert hash_key.refresh() is False
        assert hash_key.refresh() is False
    assert hash_key.value == good
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "one error for the outage, not one per look"
    assert str(secret_path) in errors[0].getMessage()
    assert good.decode() not in caplog.text
    new = _write_secret(secret_path)
    assert hash_key.refresh() is True and hash_key.value == new


async def test_the_watcher_reads_a_rotated_secret(secret_path: Path) -> None:
    hash_key = SecretFile(secret_path)
    watcher = asyncio.create_task(hash_key.watch(interval_s=0.05))
    try:
        new = _write_secret(secret_path)

        async def rotated() -> bool:
            return hash_key.value == new

        await eventually(rotated, within=5)
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


def test_the_secret_never_shows_in_a_repr(secret_path: Path) -> None:
    secret = secret_path.read_bytes().rstrip(b"\n").decode()
    settings = Settings(client_ip=ClientIpSettings(hash_key=SecretFile(secret_path)))
    assert secret not in repr(settings) and str(secret_path) in repr(settings)


# A key's own mode.


@pytest.mark.parametrize(
    ("gateway", "key", "kept"),
    [
        ("full", None, IPV4),
        ("full", "off", None),
        ("full", "truncated", "203.0.113.0"),
        ("off", "full", IPV4),
        ("off", None, None),
        ("truncated", "full", IPV4),
        ("hashed", "off", None),
        ("hashed", "truncated", "203.0.113.0"),
        ("truncated", "hashed", "hashed"),
        ("full", "hashed", "hashed"),
    ],
)
def test_a_keys_mode_comes_before_the_gateways(
    secret_path: Path, gateway: str, key: str | None, kept: str | None
) -> None:
    hash_key = SecretFile(secret_path)
    settings = ClientIpSettings(mode=gateway, hash_key=hash_key)
    if kept == "hashed":
        kept = _expected_hash(hash_key.value, IPV4)
    assert _kept(IPV4, settings, _key(key)) == kept


def test_a_key_asking_for_hashed_without_a_secret_keeps_nothing() -> None:
    # The keys file such a key is in is refused (below); a key made in code keeps nothing
    # rather than the address, and the request is served.
    assert _kept(IPV4, ClientIpSettings(), _key("hashed")) is None


# Settings.


def test_the_settings_are_read(secret_path: Path) -> None:
    settings = Settings.from_env(
        {
            "CAFE_CLIENT_IP": "Hashed",
            "CAFE_CLIENT_IP_IPV4_PREFIX": "16",
            "CAFE_CLIENT_IP_IPV6_PREFIX": "56",
            "CAFE_CLIENT_IP_HASH_KEY_FILE": str(secret_path),
        }
    )
    assert settings.client_ip == ClientIpSettings(
        mode="hashed", ipv4_prefix=16, ipv6_prefix=56, hash_key=SecretFile(secret_path)
    )
    assert settings.client_ip.hash_key is not None
    assert settings.client_ip.hash_key.value == secret_path.read_bytes().rstrip(b"\n")
    assert Settings.from_env({}).client_ip == ClientIpSettings(mode="full", hash_key=None)
    assert (ClientIpSettings().ipv4_prefix, ClientIpSettings().ipv6_prefix) == (24, 48)


def test_a_secret_without_hashed_is_kept_for_the_keys_that_ask(secret_path: Path) -> None:
    env = {"CAFE_CLIENT_IP": "truncated", "CAFE_CLIENT_IP_HASH_KEY_FILE": str(secret_path)}
    assert Settings.from_env(env).client_ip.hash_key == SecretFile(secret_path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAFE_CLIENT_IP": "partial"},
         "CAFE_CLIENT_IP='partial' is not one of full, truncated, hashed, off"),
        ({"CAFE_CLIENT_IP_IPV4_PREFIX": "33"}, "CAFE_CLIENT_IP_IPV4_PREFIX=33 is outside 0..32"),
        ({"CAFE_CLIENT_IP_IPV4_PREFIX": "/24"},
         "CAFE_CLIENT_IP_IPV4_PREFIX='/24' is not an integer"),
        ({"CAFE_CLIENT_IP_IPV6_PREFIX": "129"}, "CAFE_CLIENT_IP_IPV6_PREFIX=129 is outside 0..128"),
        ({"CAFE_CLIENT_IP": "hashed"},
         "CAFE_CLIENT_IP=hashed needs CAFE_CLIENT_IP_HASH_KEY_FILE"),
        ({"CAFE_CLIENT_IP_HASH_KEY_FILE": "{missing}"},
         "CAFE_CLIENT_IP_HASH_KEY_FILE={missing}: cannot read it: No such file"),
        ({"CAFE_CLIENT_IP_HASH_KEY_FILE": "{empty}"},
         "CAFE_CLIENT_IP_HASH_KEY_FILE={empty}: its first line, the secret, is empty"),
        ({"CAFE_CLIENT_IP_HASH_KEY_FILE": "{blank}"},
         "CAFE_CLIENT_IP_HASH_KEY_FILE={blank}: its first line, the secret, is empty"),
        ({"CAFE_CLIENT_IP_HASH_KEY_FILE": "{short}"},
         "CAFE_CLIENT_IP_HASH_KEY_FILE={short}: the secret is 15 bytes; at least 16"),
        ({"CAFE_CLIENT_IP_HASH_KEY_FILE": "{directory}"},
         "CAFE_CLIENT_IP_HASH_KEY_FILE={directory}: cannot read it"),
    ],
)  # fmt: skip
def test_a_bad_setting_stops_start_up_naming_the_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    message: str,
) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "blank").write_bytes(b"\nsecret-on-the-second-line\n")
    (tmp_path / "short").write_bytes(b"0123456789abcde\n")
    files = {name: str(tmp_path / name) for name in ("missing", "empty", "blank", "short")}
    files["directory"] = str(tmp_path)
    env = {name: value.format(**files) for name, value in env.items()}
    message = message.format(**files)
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert message in str(info.value)
    assert all(name in str(info.value) for name in env)
    # As `serve` and every command meet it: exit status 2, the message on stderr.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["keys", "--keys-file", str(tmp_path / "keys.json"), "list"]) == 2
    assert message in capsys.readouterr().err


def test_settings_made_in_code_hold_to_the_rule() -> None:
    with pytest.raises(ConfigError, match="CAFE_CLIENT_IP=hashed needs"):
        ClientIpSettings(mode="hashed")


# The keys file and the key store.


def test_the_keys_file_keeps_a_keys_mode_and_loads_without_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    plain, hashed, off = _key(), _key("hashed"), _key("off")
    write_keys_file(path, [plain, hashed, off])
    assert read_keys_file(path) == [plain, hashed, off]
    entries = orjson.loads(path.read_bytes())["keys"]
    # Written only when set: a file where no key sets it is what older gateways read.
    assert "client_ip" not in entries[0]
    assert [e.get("client_ip") for e in entries] == [None, "hashed", "off"]
    # A file of before the field, and one with it null, load with no mode of their own.
    entries[0]["client_ip"] = None
    del entries[2]["client_ip"]
    path.write_bytes(orjson.dumps({"keys": entries}))
    assert [k.client_ip for k in read_keys_file(path)] == [None, "hashed", None]


@pytest.mark.parametrize("value", ["partial", "HASHED", "", 1, ["off"]])
def test_a_mode_the_gateway_does_not_know_is_refused(tmp_path: Path, value: object) -> None:
    path = tmp_path / "keys.json"
    write_keys_file(path, [_key()])
    doc = orjson.loads(path.read_bytes())
    doc["keys"][0]["client_ip"] = value
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(KeysFileError, match=r"keys\[0\]: client_ip must be one of full, trunc"):
        read_keys_file(path)


def test_a_store_without_a_secret_refuses_a_key_asking_for_hashed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    plain, hashed = _key(), _key("hashed")
    write_keys_file(path, [plain, hashed])
    with pytest.raises(KeysFileError) as info:
        KeyStore(path).load()
    assert f"key {hashed.id} asks for hashed" in str(info.value)
    assert "CAFE_CLIENT_IP_HASH_KEY_FILE" in str(info.value)
    able = KeyStore(path, can_hash_client_ip=True)
    able.load()
    assert len(able) == 2

    # Changed while the gateway runs: the last good keys stay, and the reason is logged.
    write_keys_file(path, [plain])
    store = KeyStore(path)
    store.load()
    write_keys_file(path, [plain, hashed])
    with caplog.at_level(logging.ERROR, logger="gateway.keys.store"):
        assert store.reload_if_changed() is False
    assert len(store) == 1
    assert f"key {hashed.id} asks for hashed" in caplog.text


def test_a_successor_keeps_the_keys_mode() -> None:
    old = _key("truncated")
    _, successor, _ = rotate_key([old], old.id, 60, 0)
    assert successor.client_ip == "truncated"


# The CLI.


def test_keys_update_sets_and_clears_a_keys_mode(
    key_file: KeyFile, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAFE_CLIENT_IP_HASH_KEY_FILE", raising=False)
    path, key_id = str(key_file.path), key_file.record.id
    update = ["keys", "update", key_id, "--keys-file", path]

    def listed() -> str:
        capsys.readouterr()
        assert main(["keys", "list", "--keys-file", path]) == 0
        return capsys.readouterr().out.rstrip("\n").split("\t")[6]

    assert listed() == "default"
    for mode in ("truncated", "off", "full"):
        assert main([*update, "--client-ip", mode]) == 0
        (key,) = read_keys_file(key_file.path)
        assert key.client_ip == mode
        assert listed() == mode
    assert main([*update, "--client-ip", "default"]) == 0
    (key,) = read_keys_file(key_file.path)
    assert key.client_ip is None and key == key_file.record
    assert listed() == "default"
    assert "client_ip" not in key_file.path.read_text()


def test_keys_update_refuses_hashed_without_the_secret(
    key_file: KeyFile,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    secret_path: Path,
) -> None:
    monkeypatch.delenv("CAFE_CLIENT_IP_HASH_KEY_FILE", raising=False)
    update = ["keys", "update", key_file.record.id, "--keys-file", str(key_file.path)]
    before = key_file.path.read_bytes()
    assert main([*update, "--client-ip", "hashed"]) == 1
    assert "--client-ip hashed needs CAFE_CLIENT_IP_HASH_KEY_FILE" in capsys.readouterr().err
    assert key_file.path.read_bytes() == before
    with pytest.raises(SystemExit):
        main([*update, "--client-ip", "masked"])
    assert "invalid choice: 'masked'" in capsys.readouterr().err
    assert key_file.path.read_bytes() == before

    monkeypatch.setenv("CAFE_CLIENT_IP_HASH_KEY_FILE", str(secret_path))
    assert main([*update, "--client-ip", "hashed"]) == 0
    assert read_keys_file(key_file.path)[0].client_ip == "hashed"


# Through the app, as records arrive: both paths, each mode, a rotation while serving.


def _headers_of(sink: MemorySink) -> list[dict[str, bytes]]:
    return [
        dict(message.headers or []) for messages in produced(sink).values() for message in messages
    ]


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "middlewares"])
@pytest.mark.parametrize("mode", ["full", "truncated", "hashed", "off"])
async def test_the_records_carry_what_the_mode_keeps(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secret_path: Path,
    mode: str,
    fast_lane: bool,
) -> None:
    hash_key = SecretFile(secret_path)
    settings = gateway_settings(
        keys_file=key_file.path,
        fast_lane=fast_lane,
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
        client_ip=ClientIpSettings(mode=mode, hash_key=hash_key),
    )
    sink = MemorySink()
    client = await gateway_client(settings, sink=sink)
    headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
    for address in (IPV4, IPV6):
        sent = {**headers, "X-Forwarded-For": address}
        resp = await client.post("/v1/activity", data=curl_bodies()["activity"], headers=sent)
        assert resp.status == 200, await resp.text()
        # GET /v1/ip answers the caller about itself, whatever is kept.
        ip = await client.get("/v1/ip", headers=sent)
        assert await ip.json() == {"ip": address}
    kept = [h.get("cafe-client-ip") for h in _headers_of(sink)]
    expected: dict[str, list[str | None]] = {
        "full": [IPV4, IPV6],
        "truncated": ["203.0.113.0", "2001:db8:1::"],
        "hashed": [_expected_hash(hash_key.value, a) for a in (IPV4, IPV6)],
        "off": [None, None],
    }
    assert kept == [None if e is None else e.encode() for e in expected[mode]]


async def test_a_running_gateway_takes_up_a_rotated_secret(
    gateway_client: GatewayClient, key_file: KeyFile, secret_path: Path
) -> None:
    settings = gateway_settings(
        keys_file=key_file.path,
        client_ip=ClientIpSettings(mode="hashed", hash_key=SecretFile(secret_path)),
    )
    sink = MemorySink()
    client = await gateway_client(settings, sink=sink)
    assert settings.client_ip.hash_key is not None
    old = settings.client_ip.hash_key.value
    new = _write_secret(secret_path)

    async def post() -> bytes | None:
        headers = {"x-api-key": key_file.key, "Content-Type": "application/json"}
        resp = await client.post("/v1/activity", data=curl_bodies()["activity"], headers=headers)
        assert resp.status == 200
        return _headers_of(sink)[-1].get("cafe-client-ip")

    assert await post() in (
        _expected_hash(old, "127.0.0.1").encode(),
        _expected_hash(new, "127.0.0.1").encode(),
    )

    async def rotated() -> bool:
        return await post() == _expected_hash(new, "127.0.0.1").encode()

    # The app's watcher reads the file every 2 s.
    await eventually(rotated, within=10)
