"""The `cafe-gateway keys` commands: what they print, where --keys-file may go, and
concurrent changes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.keys import hash_key, read_keys_file
from tests.keys import make_key_file


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
from gateway import cli, keys

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
