"""A PgBouncer of the test's own (Debian package `pgbouncer`), on an ephemeral port, in
transaction pooling mode, in front of the shared PostgreSQL; stopped by its PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

INI = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = transaction
default_pool_size = {pool}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_dir(ini: str, user: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="chatd-pgbouncer-"))
    tmp.chmod(0o755)  # PgBouncer refuses to run as root: it reads these as `nobody`
    (tmp / "userlist.txt").write_text(f'"{user}" ""\n')
    (tmp / "pgbouncer.ini").write_text(ini.replace("{dir}", str(tmp)))
    return tmp


@contextlib.asynccontextmanager
async def pgbouncer(host: str, port: int, user: str, *, pool: int = 2) -> AsyncIterator[int]:
    """Run PgBouncer (server connections per database and user: `pool`); yield its port."""
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    listen = _free_port()
    tmp = _config_dir(INI.format(host=host, port=port, listen=listen, dir="{dir}", pool=pool), user)
    args = [exe, str(tmp / "pgbouncer.ini")]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]
    proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(10):
            while b"listening on" not in (line := await proc.stderr.readline()):
                assert line, "pgbouncer exited before listening"
        drain = asyncio.create_task(_drain(proc.stderr))
        yield listen
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
