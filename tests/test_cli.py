"""The `cafe-gateway keys` commands: what they print, where --keys-file may go, and
concurrent changes."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from devkit.samples import sample_api_key
from gateway.cli import main
from gateway.keys.file import merge_last_used, read_keys_file, update_keys_file
from gateway.keys.model import ApiKey, change_key, hash_key, utc_text
from tests.support.keys import KeyFile, make_key_file


@pytest.fixture(autouse=True)
def _no_keys_file_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAFE_KEYS_FILE", raising=False)


def _keys(path: Path, action: list[str], *, position: str) -> list[str]:
    """`keys ACTION ...` with --keys-file before or after the action."""
    option = ["--keys-file", str(path)]
    if position == "before":
        return ["keys", *option, *action]
    return ["keys", action[0], *option, *action[1:]]


def test_keys_commands_create_list_disable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    assert main(["keys", "--keys-file", str(path), "create", "--platform", "web"]) == 0
    out, err = capsys.readouterr()
    plaintext = out.strip()
    (record,) = read_keys_file(path)
    # stdout holds the plaintext alone, so `$(cafe-gateway keys create ...)` captures it.
    assert out == plaintext + "\n"
    assert record.sha256 == hash_key(plaintext)
    assert record.id in err and plaintext not in err

    assert main(["keys", "--keys-file", str(path), "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith(f"{record.id}\tenabled\t")
    assert plaintext not in listed

    assert main(["keys", "--keys-file", str(path), "disable", record.id]) == 0
    assert read_keys_file(path)[0].enabled is False
    assert main(["keys", "--keys-file", str(path), "disable", "k_000000000000"]) == 1
    assert "no key with id k_000000000000" in capsys.readouterr().err


def test_keys_file_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAFE_KEYS_FILE", str(tmp_path / "env-keys.json"))
    assert main(["keys", "create", "--platform", "web"]) == 0
    assert len(read_keys_file(tmp_path / "env-keys.json")) == 1
    monkeypatch.delenv("CAFE_KEYS_FILE")
    assert main(["keys", "list"]) == 1
    assert "pass --keys-file or set CAFE_KEYS_FILE" in capsys.readouterr().err


def test_a_malformed_file_is_reported_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{oops")
    assert main(["keys", "--keys-file", str(path), "create", "--platform", "web"]) == 1
    assert "not JSON" in capsys.readouterr().err
    assert path.read_text() == "{oops"


@pytest.mark.parametrize("position", ["before", "after"])
def test_keys_file_goes_before_or_after_the_action(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], position: str
) -> None:
    path = tmp_path / "keys.json"
    assert main(_keys(path, ["create", "--platform", "web"], position=position)) == 0
    plaintext = capsys.readouterr().out.strip()
    (record,) = read_keys_file(path)
    assert record.sha256 == hash_key(plaintext)

    assert main(_keys(path, ["list"], position=position)) == 0
    assert capsys.readouterr().out.startswith(f"{record.id}\tenabled\t")

    assert main(_keys(path, ["disable", record.id], position=position)) == 0
    assert read_keys_file(path)[0].enabled is False


def test_keys_file_after_the_action_wins_over_one_before(tmp_path: Path) -> None:
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    argv = ["keys", "--keys-file", str(before), "create", "--keys-file", str(after)]
    assert main([*argv, "--platform", "web"]) == 0
    assert not before.exists()
    assert len(read_keys_file(after)) == 1


def test_the_documented_form_runs_as_a_command(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "--platform", "web",
         "--keys-file", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    (record,) = read_keys_file(path)
    assert record.sha256 == hash_key(created.stdout.strip())


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create", "--platform", "web"],
        ["keys", "list"],
        ["keys", "disable", "k_000000000000"],
        ["keys", "enable", "k_000000000000"],
        ["keys", "update", "k_000000000000", "--browser"],
        ["keys", "rotate", "k_000000000000"],
    ],
)
def test_no_keys_file_anywhere_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 1
    assert "no keys file: pass --keys-file or set CAFE_KEYS_FILE" in capsys.readouterr().err


# Run by each racing process: wait for the others, then run the command with a slow
# read, so that every read-modify-write overlaps the others unless something orders them.
_RACER = """
import sys, time
from pathlib import Path
from gateway import cli
from gateway.keys import file as keys

ready, go, delay, argv = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
read = keys.read_keys_file

def slow_read(path):
    keys = read(path)
    time.sleep(delay)
    return keys

keys.read_keys_file = slow_read
ready.touch()
while not go.exists():
    time.sleep(0.002)
sys.exit(cli.main(argv))
"""


def test_concurrent_creates_and_disables_all_take_effect(tmp_path: Path) -> None:
    key_file = make_key_file(tmp_path)
    doomed = [key_file.add("web")[1].id for _ in range(10)]
    go = tmp_path / "go"
    racers = []
    for i, action in enumerate(
        [["create", "--platform", f"p{i}"] for i in range(10)]
        + [["disable", key_id] for key_id in doomed]
    ):
        argv = ["keys", *action, "--keys-file", str(key_file.path)]
        racers.append(
            subprocess.Popen(
                [sys.executable, "-c", _RACER, str(tmp_path / f"ready-{i}"), str(go), "0.1", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(len(racers))):
        assert time.monotonic() < deadline, "the racing processes did not start"
        time.sleep(0.01)
    go.touch()
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * len(racers), outputs

    keys = {k.sha256: k for k in read_keys_file(key_file.path)}
    created = [hash_key(out.strip()) for out, _ in outputs[:10]]
    assert all(digest in keys for digest in created), "a created key was lost"
    by_id = {k.id: k for k in keys.values()}
    assert [by_id[key_id].enabled for key_id in doomed] == [False] * 10, "a disable was lost"
    assert by_id[key_file.record.id].enabled
    assert len(keys) == 21
    # The lock file stays, so the next writer locks the same inode; it holds nothing.
    assert (tmp_path / "keys.json.lock").stat().st_mode & 0o777 == 0o600


SPEC_SAMPLE_KEY = sample_api_key()


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def _key(path: Path, key_id: str) -> ApiKey:
    (key,) = [k for k in read_keys_file(path) if k.id == key_id]
    return key


def test_import_reads_the_key_from_stdin_and_prints_its_new_id(
    key_file: KeyFile, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stdin(monkeypatch, SPEC_SAMPLE_KEY + "\n")
    argv = ["keys", "import", "--keys-file", str(key_file.path), "--platform", "web"]
    assert main([*argv, "--records-per-second", "50"]) == 0
    out, err = capsys.readouterr()
    key_id = out.strip()
    key = _key(key_file.path, key_id)
    assert key.sha256 == hash_key(SPEC_SAMPLE_KEY)  # the newline is not part of the key
    assert key.platforms == ("web",) and key.records_per_second == 50
    assert SPEC_SAMPLE_KEY not in err and SPEC_SAMPLE_KEY not in key_file.path.read_text()

    # The same key again is refused, naming the key that has it.
    _stdin(monkeypatch, SPEC_SAMPLE_KEY)
    assert main(argv) == 1
    assert f"already in the keys file as {key_id}" in capsys.readouterr().err
    assert len(read_keys_file(key_file.path)) == 2


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("", "the key is empty"),
        ("\n", "the key is empty"),
        ("tooShort123\n", "shorter than 20 characters"),
        (SPEC_SAMPLE_KEY + "\n\n", "printable ASCII"),
        ("passwordpassword1234", "repeats"),
    ],
)
def test_import_refuses_a_weak_key_and_writes_nothing(
    key_file: KeyFile,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdin: str,
    message: str,
) -> None:
    before = key_file.path.read_bytes()
    _stdin(monkeypatch, stdin)
    assert main(["keys", "import", "--keys-file", str(key_file.path), "--platform", "web"]) == 1
    out, err = capsys.readouterr()
    assert message in err and out == ""
    assert key_file.path.read_bytes() == before


def test_import_from_a_terminal_does_not_echo_the_key(
    key_file: KeyFile, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []

    def getpass(prompt: str) -> str:
        prompts.append(prompt)
        return SPEC_SAMPLE_KEY

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", getpass)
    assert main(["keys", "import", "--keys-file", str(key_file.path), "--platform", "web"]) == 0
    assert prompts and _key(key_file.path, capsys.readouterr().out.strip()).enabled


def test_import_via_a_pipe_runs_as_a_command(key_file: KeyFile) -> None:
    imported = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "import", "--platform", "web",
         "--keys-file", str(key_file.path)],
        input=SPEC_SAMPLE_KEY + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert _key(key_file.path, imported.stdout.strip()).sha256 == hash_key(SPEC_SAMPLE_KEY)


def test_enable_undoes_disable_and_clears_an_expiry(
    key_file: KeyFile, capsys: pytest.CaptureFixture[str]
) -> None:
    path, key_id = str(key_file.path), key_file.record.id
    assert main(["keys", "disable", key_id, "--keys-file", path]) == 0
    assert main(["keys", "enable", key_id, "--keys-file", path]) == 0
    assert _key(key_file.path, key_id).enabled
    assert "expiry" not in capsys.readouterr().err

    update_keys_file(
        key_file.path,
        lambda keys: change_key(keys, key_id, lambda k: replace(k, expires_at=utc_text(0))),
    )
    assert main(["keys", "enable", key_id, "--keys-file", path]) == 0
    assert _key(key_file.path, key_id).expires_at is None
    assert "cleared its expiry (was 1970-01-01T00:00:00Z)" in capsys.readouterr().err


def test_update_changes_only_what_it_is_given(
    key_file: KeyFile, capsys: pytest.CaptureFixture[str]
) -> None:
    path, key_id = str(key_file.path), key_file.record.id
    update = ["keys", "update", key_id, "--keys-file", path]
    assert main([*update, "--origin", "https://a.example", "--origin", "https://b.example",
                 "--browser", "--requests-per-second", "10"]) == 0  # fmt: skip
    key = _key(key_file.path, key_id)
    assert key.origins == ("https://a.example", "https://b.example") and key.browser
    assert key.requests_per_second == 10 and key.platforms == ("analytics-portal",)

    assert main([*update, "--platform", "web", "--platform", "app",
                 "--requests-per-second", "none", "--records-per-second", "3"]) == 0  # fmt: skip
    key = _key(key_file.path, key_id)
    assert key.platforms == ("web", "app") and key.origins == (
        "https://a.example",
        "https://b.example",
    )
    assert key.requests_per_second is None and key.records_per_second == 3

    assert main([*update, "--no-browser", "--no-origins"]) == 0
    key = _key(key_file.path, key_id)
    assert key.origins == () and not key.browser and key.platforms == ("web", "app")
    capsys.readouterr()


def test_an_update_that_breaks_a_rule_writes_nothing(
    key_file: KeyFile, capsys: pytest.CaptureFixture[str]
) -> None:
    before = key_file.path.read_bytes()
    update = ["keys", "update", key_file.record.id, "--keys-file", str(key_file.path)]
    assert main([*update, "--browser"]) == 1
    assert "a browser key needs at least one origin" in capsys.readouterr().err
    assert key_file.path.read_bytes() == before
    with pytest.raises(SystemExit):
        main([*update, "--requests-per-second", "-1"])
    assert "-1 is not a positive number or none" in capsys.readouterr().err
    assert key_file.path.read_bytes() == before


def test_rotate_prints_a_successor_and_dates_the_old_key(
    key_file: KeyFile, capsys: pytest.CaptureFixture[str]
) -> None:
    path, old_id = str(key_file.path), key_file.record.id
    assert main(["keys", "update", old_id, "--keys-file", path, "--records-per-second", "7"]) == 0
    started = time.time()
    assert main(["keys", "rotate", old_id, "--keys-file", path, "--grace", "2h"]) == 0
    out, err = capsys.readouterr()
    old, new = read_keys_file(key_file.path)
    assert new.sha256 == hash_key(out.strip()) and out == out.strip() + "\n"
    assert (new.platforms, new.records_per_second) == (old.platforms, old.records_per_second)
    assert old.enabled and old.expires_epoch is not None
    assert started + 7200 - 1 <= old.expires_epoch <= time.time() + 7200
    assert f"{new.id} replaces {old_id}, which stops working at {old.expires_at}" in err

    assert main(["keys", "rotate", old_id, "--keys-file", path, "--grace", "0s"]) == 0
    assert _key(key_file.path, old_id).state() == "expired"
    with pytest.raises(SystemExit):
        main(["keys", "rotate", old_id, "--keys-file", path, "--grace", "soon"])
    assert "--grace='soon' is not a duration" in capsys.readouterr().err


def test_list_shows_state_expiry_last_use_and_limits(
    key_file: KeyFile, capsys: pytest.CaptureFixture[str]
) -> None:
    path, first = str(key_file.path), key_file.record.id
    _, second = key_file.add("web")
    _, third = key_file.add("web")
    assert main(["keys", "update", second.id, "--keys-file", path,
                 "--requests-per-second", "5", "--records-per-second", "100"]) == 0  # fmt: skip
    assert main(["keys", "rotate", second.id, "--keys-file", path, "--grace", "0s"]) == 0
    assert main(["keys", "disable", third.id, "--keys-file", path]) == 0
    merge_last_used(key_file.path, {first: "2026-12-01T00:00:00Z"})
    capsys.readouterr()

    assert main(["keys", "list", "--keys-file", path]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    by_id = {row[0]: row for row in rows}
    assert by_id[first][1:2] + by_id[first][3:] == [
        "enabled", "-", "2026-12-01T00:00:00Z", "analytics-portal", "default", "unlimited"
    ]  # fmt: skip
    assert by_id[second.id][1] == "expired" and by_id[second.id][3].endswith("Z")
    assert by_id[second.id][4:] == ["never", "web", "default", "5 requests/s, 100 records/s"]
    assert by_id[third.id][1] == "disabled"
    assert len(rows) == 4  # and the successor
