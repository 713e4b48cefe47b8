"""`ner serve --workers N`: a listening socket per worker (SO_REUSEPORT), so connections opened at
once are spread over the workers (uvicorn's shared socket put 32 of 32 on one worker in one of
four runs, and 28 or 31 in two others); a dead worker is replaced; a worker that cannot start its
application stops the whole service; SIGTERM stops every worker."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.serving import supervisor
from tests.support import free_port, serve_env, start_serve, wait_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not supervisor.available(), reason="SO_REUSEPORT balancing is Linux-only")


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _connections_by_pid(port: int, pids: set[int]) -> dict[int, int]:
    """Established connections on local ``port`` held by each of ``pids`` (from /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
            inodes.add(fields[9])
    counts = {}
    for pid in pids:
        n = 0
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        counts[pid] = n
    return counts


def _open_at_once(port: int, n: int) -> list[socket.socket]:
    """``n`` keep-alive connections, all connected before any is used; each then answers /healthz."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    for c in conns:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for c in conns:
        assert c.recv(4096).startswith(b"HTTP/1.1 200"), "a connection got no answer"
    return conns


def _serve(env: dict, port: int, *extra: str) -> subprocess.Popen:
    return start_serve(env, port, *extra)


def _env(tmp_path: Path, model: Path) -> dict:
    return serve_env(DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}", NER_MODEL=str(model))


def _spread(port: int, server_pid: int) -> list[int]:
    conns = _open_at_once(port, 32)
    try:
        counts = _connections_by_pid(port, _children(server_pid))
    finally:
        for c in conns:
            c.close()
    return sorted(n for n in counts.values() if n)


@pytest.mark.slow
def test_connections_are_spread_over_workers_and_a_dead_worker_is_replaced(tmp_path, small_model_dir):
    env = _env(tmp_path, small_model_dir)
    assert subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=ROOT, capture_output=True).returncode == 0
    port = free_port()
    server = _serve(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        time.sleep(3)  # /readyz came from one worker; the other may still be loading
        # binomial(32, 1/2): each worker below 4 connections has a chance of about 1e-6
        spread = _spread(port, server.pid)
        assert len(spread) == 2 and sum(spread) == 32 and spread[0] >= 4, f"connections per worker: {spread}"

        # the port is taken while it serves, by a socket with or without SO_REUSEPORT
        with pytest.raises(OSError):
            supervisor.check_port_free("127.0.0.1", port)

        before = _children(server.pid)
        victim = max(before)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: _children(server.pid) - before, timeout=60, what="the dead worker being replaced", interval=0.3, process=server)
        # the other worker answers meanwhile, and the replacement takes its share once it has started
        assert httpx.post(base + "/tag", json={"text": "Tom visited Oslo ."}, timeout=30).status_code == 200
        spread = wait_until(lambda: (s if len(s := _spread(port, server.pid)) >= 2 else None), timeout=60,
                            what="the replacement worker accepting a connection", interval=0.5)
        assert sum(spread) == 32 and spread[0] >= 4, f"connections per worker after the restart: {spread}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert server.returncode == 0
    left = _children(server.pid)
    assert not left, f"workers outlived the supervisor: {left}"


def test_a_worker_that_cannot_start_stops_the_service(tmp_path):
    env = _env(tmp_path, tmp_path / "no-such-model")
    port = free_port()
    server = _serve(env, port)
    try:
        out, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == 1, out[-3000:]
    assert "could not start the application" in out


def test_a_taken_port_is_refused(tmp_path, small_model_dir):
    env = _env(tmp_path, small_model_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_auto_migrate_runs_once_in_the_supervisor_before_the_workers(tmp_path, monkeypatch, small_model_dir):
    """Two workers each migrating one fresh database raced (one failed on a column the other had
    just added: 1 start in 4 stopped). The supervisor migrates first; the workers only check."""
    from service import cli
    from service.store.session import check_schema, make_engine

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    for name, value in {"DATABASE_URL": url, "AUTO_MIGRATE": "true", "NER_MODEL": str(small_model_dir), "BIND_HOST": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    seen = {}

    def fake_run(self):  # what a worker would find when it starts: the settings it is handed, the database
        seen["auto_migrate"] = self.config_kwargs["app"].settings.auto_migrate
        engine = make_engine(url)
        try:
            check_schema(engine)  # raises SchemaError on an unmigrated database
        finally:
            engine.dispose()
        seen["schema"] = "current"
        return 0

    monkeypatch.setattr(supervisor.Supervisor, "run", fake_run)
    assert cli.main(["serve", "--workers", "2", "--port", str(free_port())]) == 0
    assert seen == {"auto_migrate": False, "schema": "current"}
    assert os.environ["AUTO_MIGRATE"] == "true"  # the environment is left alone
