"""The command line: `chatd token`, `chatd migrate`, and refusing bad configuration."""

from __future__ import annotations

import gc
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chatd.auth import Authenticator
from chatd.cli import main, tune_gc
from storage.migrate import current_revision, head_revision

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"


def test_token_uses_the_generated_secret_beside_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATD_JWT_SECRET", raising=False)
    db = f"sqlite:///{tmp_path}/chat.db"
    assert main(["token", "alice", "--db", db, "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    secret_file = tmp_path / "chat.db.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    # `chatd serve` on the same database reads the same file, so it accepts this token.
    assert Authenticator(secret_file.read_text().strip()).verify(token) == "alice"


def test_token_refuses_an_invalid_user_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "not a user", "--jwt-secret", "s" * 32]) == 2
    assert "user ids" in capsys.readouterr().err


def test_migrate_applies_every_migration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path}/m.db"
    assert main(["migrate", "--db", db]) == 0
    assert "migrations applied" in capsys.readouterr().out
    assert current_revision(db) == head_revision()
    assert main(["migrate", "--db", db]) == 0  # a second run is a no-op


def test_bad_configuration_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATD_BROKER", "zeromq")
    assert main(["serve"]) == 2
    assert "zeromq" in capsys.readouterr().err


def test_unreachable_database_at_start_exits_1_with_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chatd", "serve", "--port", "0", "--db", UNREACHABLE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("chatd: ")
    assert "Traceback" not in out.stderr


def test_tune_gc_sets_the_young_threshold_and_freezes_startup() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(20_000)
        assert gc.get_threshold() == (20_000, 50, 100)
        assert gc.get_freeze_count() > 0
        tune_gc(0)  # 0 keeps the thresholds as they are
        assert gc.get_threshold() == (20_000, 50, 100)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", "serve", "--port", "0", "--jwt-secret", "s" * 32, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("chatd: ")
    return last


def test_serve_refuses_a_database_it_may_not_migrate(tmp_path: Path) -> None:
    """`--migrate false` on a database without the schema: it used to start, say
    ready, and answer every hello `unavailable`."""
    line = _one_line_error(_serve("--db", f"sqlite:///{tmp_path}/new.db", "--migrate", "false"))
    assert "no chatd schema" in line and "chatd migrate" in line


def test_serve_refuses_a_schema_newer_than_itself(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/future.db"
    assert main(["migrate", "--db", db]) == 0
    with sqlite3.connect(tmp_path / "future.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    line = _one_line_error(_serve("--db", db))
    assert "9999_future" in line and "newer chatd" in line


def test_serve_with_migrate_false_runs_on_a_newer_schema(tmp_path: Path) -> None:
    """A rolling upgrade migrates first, then restarts the old nodes with --migrate
    false: they run on the newer schema (with a warning) instead of refusing it."""
    db = f"sqlite:///{tmp_path}/rolling.db"
    assert main(["migrate", "--db", db]) == 0
    with sqlite3.connect(tmp_path / "rolling.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    argv = [sys.executable, "-m", "chatd", "serve", "--port", "0", "--db", db]
    argv += ["--jwt-secret", "s" * 32, "--migrate", "false"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "listening on ws://" in proc.stdout.readline()
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "9999_future" in err and "rolling upgrade" in err
    assert proc.returncode == 0


def test_serve_on_a_taken_port_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatd",
                "serve",
                "--port",
                str(port),
                "--jwt-secret",
                "s" * 32,
                "--db",
                f"sqlite:///{tmp_path}/p.db",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert "address already in use" in _one_line_error(out)
