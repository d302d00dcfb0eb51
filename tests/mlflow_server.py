"""A real MLflow tracking server for tests/test_mlflow.py: started once per test session, whatever
the number of test processes, and stopped when the session ends (conftest.pytest_sessionfinish).

It takes ~20 s to start on 2 busy cores, so pytest-xdist's workers share one: the first that asks
starts it under a lock in the session's temporary folder and writes its address there; the others
read it. A worker cannot know whether another still needs it, so the controller process, which
outlives them, stops it (its whole process group: uvicorn's workers too)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

INFO = "mlflow-server.json"  # {"uri": ..., "pid": ...} in the session's folder


def session_root(config) -> Path:
    """The session's temporary folder, the same in every test process (as helpers.built_once)."""
    root = config._tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def shared_server(config, timeout: float = 180) -> str:
    """The tracking URI of the session's server, started here if no test process did yet."""
    root = session_root(config)
    with open(root / f"{INFO}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (root / INFO).is_file():
            return json.loads((root / INFO).read_text())["uri"]
        store = root / "mlflow-server"
        store.mkdir(exist_ok=True)
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]
        # SQLite for runs, artifacts served by the server itself (what a shared server does);
        # one worker: the tests send a few requests at a time; no job runner (its seven
        # processes, for MLflow's GenAI jobs, would double the start-up on two cores)
        log = open(store / "server.log", "w")
        proc = subprocess.Popen(
            [*cmd, "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: stopped as one
            env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        (root / INFO).write_text(json.dumps({"uri": uri, "pid": proc.pid}))  # stopped at the end even if not up
        deadline = time.monotonic() + timeout
        while not healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(store / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        return uri


def stop_shared_server(config) -> None:
    """At the end of the session, in the process that outlives the others (the xdist controller)."""
    if config._tmp_path_factory._basetemp is None:  # no temporary folder made: no server started
        return
    info = session_root(config) / INFO
    if not info.is_file():
        return
    pid = json.loads(info.read_text())["pid"]
    info.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):  # up to 5 s, then at once
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:  # this process started it (no xdist): reaped
                    break
            except ChildProcessError:  # a worker started it: alive while it can be signalled
                os.kill(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)  # what is left of the group (uvicorn's process)
    except ProcessLookupError:
        pass
