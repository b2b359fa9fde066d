"""Run a local Flower 1.41 deployment (SuperLink + N SuperNodes) on 127.0.0.1.

Usage::

    from fedlrm.tools.deployment import LocalDeployment

    with LocalDeployment("/tmp/fl", num_supernodes=2, tls=True, auth=True) as dep:
        res = dep.run("tests/flower_hello", {"num-rounds": 2}, timeout=120)
        assert res.ok, res.logs

How Flower 1.41 is driven (verified with flwr 1.41.0):

* ``flower-superlink --host 127.0.0.1 --port P`` serves the Fleet, Control *and* Runtime
  APIs over one HTTP(S) port (FastAPI/uvicorn). ``--insecure`` or
  ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``; ``--enable-supernode-auth`` (needs
  TLS); ``--database FILE`` (SQLite) instead of the in-memory state. In ``subprocess``
  isolation it starts ``flower-superexec`` in a *new session* (so it is not in the
  SuperLink's process group), which starts one ``flwr-serverapp`` per run.
* ``flower-supernode --superlink 127.0.0.1:P --host 127.0.0.1 --port RP`` (RP is the
  SuperNode's own Runtime API port, default 9094, so it must differ per node);
  ``--insecure`` or ``--root-certificates CA``; ``--auth-supernode-private-key KEY``;
  ``--node-config FILE.toml`` (or ``'k=v k2="s"'``). It starts ``flower-superexec`` in
  its own process group, which starts one ``flwr-clientapp`` process per message.
* SuperNode auth: the SuperLink runs with ``--enable-supernode-auth`` and each SuperNode's
  EC (NIST curve) public key in OpenSSH format is registered *before* the SuperNode
  connects with ``flwr supernode register KEY.pub CONNECTION`` (Control API). Anyone who
  reaches that API may register a key (docs/security.md); :meth:`LocalDeployment.write_client_keys`
  writes the file that binds each client id to its SuperNode's key (``federation.client_keys``),
  with which the fedlrm ServerApp refuses SuperNodes whose key is not their claimed client's.
* The CLI reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink] default = NAME`` and ``[superlink.NAME] address/insecure/
  root-certificates``). Every process started here gets its own ``FLWR_HOME`` inside the
  work dir (apps are installed there too), so ``~/.flwr`` is never touched.

Every process is started with ``start_new_session=True`` and carries the environment
variables ``FEDLRM_FLWR_DEPLOY`` (one id per deployment) and ``FEDLRM_FLWR_COMPONENT``
(e.g. ``supernode-1``), which Flower's own children (SuperExec, ServerApp, ClientApp)
inherit. Killing a component therefore kills its process group, its descendants and any
process that carries its tag (found through ``/proc/*/environ``), which also catches the
detached SuperExec of the SuperLink and its ``flwr-serverapp``. ``close()`` (also via
``__exit__`` and an ``atexit`` hook) stops everything; if the owning Python process was
killed, ``deployment.json`` in the work dir lists the pids it started.

Ports: a component is given a port that is free when chosen and binds it a moment later.
Ports are chosen outside the kernel's ephemeral range, so no outgoing connection (of this
deployment's own processes, say) is handed one in between; if another process still binds
it first, the component exits with "address already in use" and is started again on a new
port. A SuperLink counts as started only once its own log says it serves the port.

Crash/restart behaviour observed with 1.41.0 (heartbeat interval fixed at 30 s):

* SIGKILLed SuperNode: the SuperLink keeps it "online" until 2 x 30 s after its last
  heartbeat; messages to it then get an error reply (``ErrorCode.NODE_UNAVAILABLE`` = 5,
  ``src_node_id`` = 1). SIGTERM deactivates it at once (error reply within ~1 s).
* Restarted SuperNode: without auth it self-registers a fresh key -> new node id; with
  auth it reuses its key -> same node id, but only after the old one went offline
  (:meth:`LocalDeployment.start_supernode` retries). ``context.state`` is not kept.
* SuperLink restart: with ``--database`` the SuperNodes reconnect (same ids), the run in
  flight ends ``finished:failed``; in-memory: SuperNodes are rejected and exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlrm.federation.flower.identity import write_client_keys
from fedlrm.federation.flower.launcher import link_as_flwr_clientapp
from fedlrm.tools.certs import AuthKeyPaths, TlsPaths, generate_supernode_keys, generate_tls_certs
from fedlrm.tools.processes import descendants, environ_has, kill_group, pid_alive, proc_table, signal_pids

__all__ = [
    "DeploymentError",
    "LocalDeployment",
    "RunResult",
    "find_free_port",
    "toml_value",
]

TAG_DEPLOY = "FEDLRM_FLWR_DEPLOY"
TAG_COMPONENT = "FEDLRM_FLWR_COMPONENT"
CONNECTION_NAME = "fedlrm-local"
HOST = "127.0.0.1"

PORT_CLASH = "address already in use"  # what a component's log says when its port was taken first
PORT_ATTEMPTS = 5
_PORTS = random.Random()  # seeded from the OS; port choice must not follow a run's seeds

BASE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


class DeploymentError(RuntimeError):
    """Raised when a component fails to start or a CLI call fails."""


@dataclass
class RunResult:
    """Outcome of :meth:`LocalDeployment.run`."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed", "running" (timeout)
    details: str
    logs: str
    elapsed_s: float
    timed_out: bool = False
    run_info: dict[str, Any] = field(default_factory=dict)  # the `flwr ls --format json` entry

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_offset: int


# ----------------------------------------------------------------------------- helpers
def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def find_free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that is free now, outside the ephemeral range (see the module
    docstring), chosen at random so that deployments started side by side rarely pick alike."""
    low, high = _ephemeral_range()
    span = (10000, low) if low - 10000 >= 1000 else (high + 1, 65536)
    for _ in range(100):
        port = _PORTS.randrange(*span)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded range: any free port
        s.bind((host, 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    """Format a scalar as a TOML value (for node/run config overrides)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))  # JSON string escapes are valid TOML
    raise TypeError(f"Unsupported config value {value!r} ({type(value).__name__})")


def _write_toml(path: Path, cfg: Mapping[str, Any]) -> Path:
    lines = []
    for k, v in cfg.items():
        key = k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)
        lines.append(f"{key} = {toml_value(v)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"`{name}` not found (is flwr installed?)")
    return found


# ----------------------------------------------------------------------------- main class
class LocalDeployment:
    """A local SuperLink + N SuperNodes, started as subprocesses; a context manager.

    Parameters
    ----------
    work_dir : directory for logs, FLWR_HOMEs, certificates, keys, node configs, state DB.
    num_supernodes : number of SuperNodes.
    node_configs : one dict per SuperNode (``--node-config``); default
        ``{"partition-id": i, "num-partitions": num_supernodes}``.
    tls : serve the SuperLink over HTTPS (a test CA and server certificate are generated).
    auth : SuperNode authentication (requires ``tls``): keys are generated per node and
        registered with ``flwr supernode register`` before each SuperNode starts;
        :meth:`write_client_keys` binds each SuperNode's client id to its key for the ServerApp.
    superexec_poll_interval : sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (s, default 1.0
        in Flower) - how often SuperExec asks for new ServerApp/ClientApp tasks.
    simulation : instead of SuperNodes, Flower's Simulation Runtime: the SuperLink runs with
        ``--simulation`` and each run is a ``flwr-simulation`` process that drives
        ``num_supernodes`` virtual SuperNodes on a pool of Ray actors. The mapping holds
        ``flwr run --federation-config`` keys, e.g. ``client-resources-num-cpus`` (whole
        CPUs in flwr 1.41) and ``client-resources-num-gpus`` (fractions share a GPU);
        node configs are Flower's (``partition-id``, ``num-partitions``).

    The SuperLink keeps its state in ``<work_dir>/superlink/state.db``, made afresh by
    :meth:`start`. The class attributes below are the waits.

    Attributes: ``port`` (SuperLink HTTP port), ``address``, ``node_ids`` (per SuperNode,
    from its log or ``flwr supernode register``), ``node_ports`` (Runtime API ports),
    ``pids`` (current main pids), ``started_pids`` (every main pid ever started),
    ``spawned_pids()`` (every live process incl. SuperExec/ServerApp/ClientApp),
    ``timings``, ``tls_paths``, ``auth_keys``, ``log_dir`` (``<name>.log`` per component).
    """

    startup_timeout = 60.0  # s to wait for the SuperLink's health check or a SuperNode's id
    cli_timeout = 120.0  # s for one `flwr` CLI call
    kill_grace = 5.0  # s between SIGTERM and SIGKILL in `close`
    # with auth: how long and how often to retry starting a SuperNode whose node id is still
    # "online" at the SuperLink after a crash
    rejoin_timeout, rejoin_retry_s = 120.0, 3.0

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        num_supernodes: int = 2,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        *,
        tls: bool = False,
        auth: bool = False,
        superexec_poll_interval: float | None = None,
        simulation: Mapping[str, Any] | None = None,
        database: bool = True,
        lean_clientapp: bool = True,
    ) -> None:
        """`database`: the SuperLink keeps its state in an SQLite file (which survives a SuperLink
        restart) rather than in memory. Under load (10 SuperNodes replying at once on 2 cores) that
        file's lock was seen to time out, and the SuperNodes whose replies it refused dropped them.
        `lean_clientapp`: the SuperNodes start `fedlrm-clientapp` (Flower's ClientApp entry point
        without the SuperNode's CLI imports, `federation/flower/launcher.py`) for every message,
        linked as `flwr-clientapp` in `<work_dir>/bin` ahead on their PATH; false: Flower's own."""
        if auth and not tls:
            raise ValueError("SuperNode authentication requires tls=True in Flower 1.41")
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.num_supernodes = int(num_supernodes)
        if node_configs is None:
            node_configs = [
                {"partition-id": i, "num-partitions": self.num_supernodes}
                for i in range(self.num_supernodes)
            ]
        if len(node_configs) != self.num_supernodes:
            raise ValueError("need exactly one node config per SuperNode")
        self.node_configs = [dict(c) for c in node_configs]
        self.simulation = dict(simulation) if simulation is not None else None
        if self.simulation is not None and (tls or auth):
            raise ValueError("the Simulation Runtime has no SuperNodes to authenticate; run it without tls/auth")
        self.tls = tls
        self.auth = auth
        self.tls_paths: TlsPaths | None = None
        self.extra_env: dict[str, str] = {}
        if superexec_poll_interval is not None:
            self.extra_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll_interval)
        self.database = str(self.work_dir / "superlink" / "state.db") if database else None
        self.clientapp_bin = self.work_dir / "bin" if lean_clientapp and simulation is None else None

        self.deploy_id = uuid.uuid4().hex[:12]
        self.port: int | None = None  # SuperLink HTTP port (Fleet + Control + Runtime)
        self.node_ports: list[int | None] = [None] * self.num_supernodes
        self.node_ids: list[int | None] = [None] * self.num_supernodes
        self.auth_keys: list[AuthKeyPaths | None] = [None] * self.num_supernodes
        self._registered: set[int] = set()
        self._procs: dict[str, _Proc] = {}
        self.started_pids: list[int] = []  # every main pid ever started, in order
        self.timings: dict[str, float] = {}
        self.cli_home = self.work_dir / "cli_flwr_home"
        self.log_dir = self.work_dir / "logs"
        self._closed = False
        self._atexit_registered = False
        self._ctl: Any = None
        self._ctl_port: int | None = None

    # ------------------------------------------------------------------ properties
    @property
    def pids(self) -> dict[str, int]:
        """Main pid of each currently managed component (``superlink``, ``supernode-i``)."""
        self.poll()
        return {name: p.popen.pid for name, p in self._procs.items()}

    def poll(self) -> dict[str, int | None]:
        """Reap exited components; return ``{name: returncode or None if running}``.

        Reaping matters: Flower's SuperExec watches its parent with ``kill(pid, 0)``,
        which still succeeds for an unreaped zombie, so a SuperNode/SuperLink that
        exited by itself keeps its SuperExec alive until it is reaped.
        """
        return {name: p.popen.poll() for name, p in self._procs.items()}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def spawned_pids(self) -> list[int]:
        """All live processes of this deployment: main pids, descendants, tagged ones."""
        self.poll()
        table = proc_table()
        needle = f"{TAG_DEPLOY}={self.deploy_id}".encode()
        out = {pid for pid in table if environ_has(pid, needle)}
        for pid in (p.popen.pid for p in self._procs.values()):
            if pid in table:
                out.add(pid)
                out |= descendants(pid, table)
        return sorted(p for p in out if pid_alive(p))

    # ------------------------------------------------------------------ env / cli
    def component_env(self, component: str, flwr_home: str | os.PathLike[str]) -> dict[str, str]:
        """Environment for an extra process that should belong to this deployment
        (tagged, so :meth:`close` kills it too)."""
        return self._env(component, Path(flwr_home))

    def _env(self, component: str, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(BASE_ENV)
        env.update(self.extra_env)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        if self.clientapp_bin is not None and component.startswith("supernode"):
            env["PATH"] = str(self.clientapp_bin) + os.pathsep + env["PATH"]
        env["FLWR_HOME"] = str(flwr_home)
        env[TAG_DEPLOY] = self.deploy_id
        env[TAG_COMPONENT] = component
        flwr_home.mkdir(parents=True, exist_ok=True)
        return env

    def _write_cli_config(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION_NAME}"',
            "",
            f"[superlink.{CONNECTION_NAME}]",
            f'address = "{self.address}"',
        ]
        if self.tls:
            assert self.tls_paths is not None
            lines.append(f"root-certificates = {toml_value(str(self.tls_paths.ca_cert))}")
        else:
            lines.append("insecure = true")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def flwr(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment (isolated FLWR_HOME)."""
        cmd = [_bin("flwr"), *args]
        env = self._env("cli", self.cli_home)
        env["COLUMNS"] = "200"
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(self.work_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout or self.cli_timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise DeploymentError(f"`flwr {' '.join(args)}` timed out") from None
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (rc={proc.returncode}):\n{out}\n{err}"
            )
        return res

    def flwr_json(self, *args: str, timeout: float | None = None) -> dict[str, Any]:
        """Run ``flwr ... --format json`` and parse the JSON object it prints."""
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        data = _parse_json(res.stdout)
        if data is None or res.returncode != 0 or not data.get("success", True):
            raise DeploymentError(
                f"`flwr {' '.join(args)} --format json` failed (rc={res.returncode}):\n"
                f"{res.stdout}\n{res.stderr}"
            )
        return data

    # ------------------------------------------------------------------ start/stop
    def __enter__(self) -> LocalDeployment:  # noqa: PYI034
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LocalDeployment:
        """Start SuperLink and all SuperNodes and wait until they are connected."""
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True
        t0 = time.monotonic()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal") if self.database else ():
            Path(self.database + suffix).unlink(missing_ok=True)
        if self.tls and self.tls_paths is None:
            self.tls_paths = generate_tls_certs(self.work_dir / "certs")
        if self.clientapp_bin is not None:
            link_as_flwr_clientapp(self.clientapp_bin)
        self.start_superlink()
        nodes = range(self.num_supernodes) if self.simulation is None else ()  # simulated: no processes
        for i in nodes:
            self.start_supernode(i, wait=False)
        for i in nodes:
            self._wait_supernode(i)
        self.timings["startup_s"] = time.monotonic() - t0
        return self

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path) -> _Proc:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as logf:
            logf.write(f"\n===== {time.strftime('%H:%M:%S')} start {name}: {' '.join(cmd)}\n".encode())
            logf.flush()
            offset = logf.tell()
            popen = subprocess.Popen(
                cmd,
                env=self._env(name, flwr_home),
                cwd=str(self.work_dir),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session + process group (pgid == pid)
            )
        proc = _Proc(name, popen, log_path, offset)
        self._procs[name] = proc
        self.started_pids.append(popen.pid)
        self._write_manifest()
        return proc

    def _write_manifest(self) -> None:
        """``<work_dir>/deployment.json``: deploy id + pids, for post-mortem cleanup
        if this Python process died without closing."""
        data = {
            "deploy_id": self.deploy_id,
            "tag": f"{TAG_DEPLOY}={self.deploy_id}",
            "port": self.port,
            "pids": {n: p.popen.pid for n, p in self._procs.items()},
            "started_pids": self.started_pids,
        }
        (self.work_dir / "deployment.json").write_text(json.dumps(data, indent=1))

    def _log_since_start(self, proc: _Proc) -> str:
        with open(proc.log_path, "rb") as f:
            f.seek(proc.log_offset)
            return f.read().decode(errors="replace")

    # SuperLink ------------------------------------------------------------------
    def start_superlink(self) -> int:
        """Start the SuperLink on a free port (another one if that is taken first); its pid."""
        if "superlink" in self._procs and pid_alive(self._procs["superlink"].popen.pid):
            raise DeploymentError("SuperLink already running")
        t0 = time.monotonic()
        for attempt in range(PORT_ATTEMPTS):
            self.port = find_free_port()
            self._write_cli_config()
            proc = self._spawn("superlink", self._superlink_cmd(), self.work_dir / "superlink" / "flwr_home")
            try:
                self._wait_superlink(proc)
            except DeploymentError:
                if PORT_CLASH not in self._log_since_start(proc) or attempt == PORT_ATTEMPTS - 1:
                    raise
                self._stop_component("superlink", signal.SIGKILL)
                continue
            self.timings["superlink_ready_s"] = time.monotonic() - t0
            return proc.popen.pid
        raise AssertionError("unreachable")

    def _superlink_cmd(self) -> list[str]:
        cmd = [_bin("flower-superlink"), "--host", HOST, "--port", str(self.port)]
        if self.tls:
            assert self.tls_paths is not None
            cmd += [
                "--ssl-ca-certfile", str(self.tls_paths.ca_cert),
                "--ssl-certfile", str(self.tls_paths.server_cert),
                "--ssl-keyfile", str(self.tls_paths.server_key),
            ]
        else:
            cmd.append("--insecure")
        if self.auth:
            cmd.append("--enable-supernode-auth")
        if self.simulation is not None:
            cmd.append("--simulation")
        if self.database:
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--database", self.database]
        return cmd + ["--disable-runtime-dependency-installation"]

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        assert self.tls_paths is not None
        return ssl.create_default_context(cafile=str(self.tls_paths.ca_cert))

    def _wait_superlink(self, proc: _Proc) -> None:
        """Until the SuperLink's own log says it serves our port and its health check answers
        (a health check alone could be answered by whoever took the port first)."""
        scheme = "https" if self.tls else "http"
        url = f"{scheme}://{self.address}/health"
        serving = re.compile(rf"Uvicorn running on \S+:{self.port}\b")
        ctx = self._ssl_context()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise DeploymentError(
                    f"{proc.name} exited (rc={proc.popen.returncode}):\n"
                    + self._log_since_start(proc)[-4000:]
                )
            if not serving.search(self._log_since_start(proc)):
                time.sleep(0.1)
                continue
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise DeploymentError(f"{proc.name} not healthy after {self.startup_timeout}s")

    # SuperNodes -----------------------------------------------------------------
    def _keys(self, i: int) -> AuthKeyPaths:
        keys = self.auth_keys[i]
        if keys is None:
            keys = generate_supernode_keys(self.work_dir / "keys", f"supernode-{i}")
            self.auth_keys[i] = keys
        return keys

    def client_of(self, i: int) -> int | None:
        """The fedlrm client SuperNode ``i`` serves: its node config's ``partition-id`` or ``client-id``."""
        cfg = self.node_configs[i]
        key = next((k for k in ("partition-id", "client-id") if k in cfg), None)
        return None if key is None else int(cfg[key])

    def write_client_keys(self, path: str | os.PathLike[str]) -> Path:
        """Write the keys file of ``federation.client_keys`` (docs/security.md): each SuperNode's client
        id with the SuperNode's public key (generated now if :meth:`start` has not yet). Needs ``auth``."""
        if not self.auth:
            raise DeploymentError("client keys need SuperNode authentication (auth=True): without it the "
                                  "SuperNodes have no keys of their own")
        clients = {}
        for i in range(self.num_supernodes):
            client = self.client_of(i)
            if client is None:
                raise DeploymentError(f"supernode-{i}'s node config {self.node_configs[i]} names no "
                                      f"partition-id or client-id, so no client can be bound to its key")
            if client in clients:
                raise DeploymentError(f"supernode-{clients[client][0]} and supernode-{i} both serve client "
                                      f"{client}; a client is bound to one SuperNode's key")
            clients[client] = (i, self._keys(i).public_key)
        return write_client_keys(path, {c: pub for c, (_, pub) in clients.items()})

    def _register(self, i: int) -> None:
        if i in self._registered:
            return
        keys = self._keys(i)
        data = self.flwr_json("supernode", "register", str(keys.public_key), CONNECTION_NAME)
        self.node_ids[i] = int(data["node-id"])
        self._registered.add(i)

    def start_supernode(self, i: int, wait: bool = True) -> int:
        """(Re)start SuperNode ``i`` with the same node config (and auth key); pid."""
        name = f"supernode-{i}"
        if name in self._procs and pid_alive(self._procs[name].popen.pid):
            raise DeploymentError(f"{name} already running")
        if self.auth:
            self._register(i)
        self.node_ports[i] = find_free_port()
        proc = self._spawn(name, self._supernode_cmd(i), self.work_dir / name / "flwr_home")
        if wait:
            self._wait_supernode(i)
        return proc.popen.pid

    def _supernode_cmd(self, i: int) -> list[str]:
        node_dir = self.work_dir / f"supernode-{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = _write_toml(node_dir / "node_config.toml", self.node_configs[i])
        cmd = [
            _bin("flower-supernode"),
            "--superlink", self.address,
            "--host", HOST,
            "--port", str(self.node_ports[i]),
            "--node-config", str(cfg_path),
        ]
        if self.tls:
            assert self.tls_paths is not None
            cmd += ["--root-certificates", str(self.tls_paths.ca_cert)]
        else:
            cmd.append("--insecure")
        if self.auth:
            keys = self.auth_keys[i]
            assert keys is not None
            cmd += ["--auth-supernode-private-key", str(keys.private_key)]
        return cmd

    def _wait_supernode(self, i: int) -> int:
        """Wait until SuperNode ``i`` logged its node id (it is registered + active).

        With auth, a SuperNode that crashed (SIGKILL) cannot re-activate its node id
        until the SuperLink has marked it offline (no heartbeat for 2 x 30 s); it then
        exits with "Failed to activate SuperNode" (exit code 305). In that case the
        SuperNode is started again every ``rejoin_retry_s`` until ``rejoin_timeout``. One that
        could not bind its Runtime API port is started again on another.
        """
        name = f"supernode-{i}"
        proc = self._procs[name]
        deadline = time.monotonic() + self.startup_timeout
        rejoin_deadline = time.monotonic() + self.rejoin_timeout
        clashes = 0
        while True:
            text = self._log_since_start(proc)
            m = re.search(r"SuperNode ID: (\d+)", text)
            if m:
                self.node_ids[i] = int(m.group(1))
                return self.node_ids[i]
            if proc.popen.poll() is not None:
                rejoin = self.auth and "Failed to activate SuperNode" in text and time.monotonic() < rejoin_deadline
                clash = PORT_CLASH in text and clashes < PORT_ATTEMPTS - 1
                if rejoin or clash:
                    if rejoin:
                        time.sleep(self.rejoin_retry_s)
                    else:
                        clashes += 1
                        self.node_ports[i] = find_free_port()
                    self._stop_component(name, signal.SIGKILL)
                    proc = self._spawn(name, self._supernode_cmd(i), self.work_dir / name / "flwr_home")
                    deadline = time.monotonic() + self.startup_timeout
                    continue
                raise DeploymentError(
                    f"{proc.name} exited (rc={proc.popen.returncode}):\n{text[-4000:]}"
                )
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"{proc.name} did not connect within {self.startup_timeout}s"
                )
            time.sleep(0.1)

    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` (default SIGKILL = crash) with its SuperExec/ClientApps."""
        self._stop_component(f"supernode-{i}", sig)

    def signal_supernode(self, i: int, sig: int) -> None:
        """Send ``sig`` to SuperNode ``i`` and everything it started (SIGSTOP: a client that hangs)."""
        signal_pids(self._component_pids(f"supernode-{i}"), sig)

    def kill_serverapp(self, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the running job's ServerApp process(es): the server dies mid-run. Returns their pids."""
        victims = []
        for pid in self.spawned_pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"flwr-serverapp" in cmdline:
                victims.append(pid)
        signal_pids(victims, sig)
        return victims

    def restart_supernode(self, i: int, sig: int = signal.SIGKILL) -> int:
        """Kill and restart SuperNode ``i`` with the same node config; return new pid.

        Without auth the restarted SuperNode registers a fresh key -> a NEW node id.
        With auth it reuses its registered key -> the SAME node id.
        """
        self.kill_supernode(i, sig)
        return self.start_supernode(i)

    # ------------------------------------------------------------------ runs
    def submit(self, app_dir: str | os.PathLike[str], run_config: Mapping[str, Any] | None = None,
               federation: str | None = None) -> int:
        """``flwr run APP CONNECTION [--run-config overrides.toml]``; return the run id."""
        args = ["run", str(Path(app_dir).resolve()), CONNECTION_NAME]
        if run_config:
            cfg_dir = self.work_dir / "run_configs"
            cfg_dir.mkdir(parents=True, exist_ok=True)
            path = _write_toml(cfg_dir / f"run-{uuid.uuid4().hex[:8]}.toml", run_config)
            args += ["--run-config", str(path)]
        if federation:
            args += ["--federation", federation]
        if self.simulation is not None:
            options = {"num-supernodes": self.num_supernodes, **self.simulation}
            args += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in options.items())]
        data = self.flwr_json(*args)
        return int(data["run-id"])

    def run_info(self, run_id: int, via: str = "cli") -> dict[str, Any]:
        """Status of a run as in ``flwr ls --run-id ID --format json`` (``runs[0]``).

        ``via="cli"`` runs ``flwr ls`` (~1 s CPU per call); ``via="api"`` calls the
        Control API's ``ListRuns`` in-process (same data, a few ms; keys ``run-id``,
        ``status``, ``status-details``, ``*-at``).
        """
        if via == "api":
            try:
                return self._run_info_api(run_id)
            except ImportError:  # pragma: no cover - flwr internals moved
                pass
        data = self.flwr_json("ls", CONNECTION_NAME, "--run-id", str(run_id))
        runs = data.get("runs", [])
        if not runs:
            raise DeploymentError(f"run {run_id} not found: {data}")
        return runs[0]

    def _control_client(self) -> Any:
        if getattr(self, "_ctl", None) is None or self._ctl_port != self.port:
            from flwr.supercore.constant import FLWR_CLIENT_METADATA_KEY
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            class CliClientHttpInterceptor:  # = flwr.cli's, without importing typer
                def intercept(self, context: Any, call_next: Any) -> Any:
                    context.request.headers[FLWR_CLIENT_METADATA_KEY] = "cli"
                    return call_next(context)

            ca = self.tls_paths.ca_cert.read_bytes() if self.tls and self.tls_paths else None
            self._ctl = ControlHttpClient.from_server_address(
                server_address=self.address,
                insecure=not self.tls,
                root_certificates=ca,
                interceptors=[
                    CliClientHttpInterceptor(),
                    RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
                ],
            )
            self._ctl_port = self.port
        return self._ctl

    def _run_info_api(self, run_id: int) -> dict[str, Any]:
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

        res = self._control_client().ListRuns(ListRunsRequest(run_id=run_id))
        if not res.run_dict:
            raise DeploymentError(f"run {run_id} not found")
        run = run_from_proto(next(iter(res.run_dict.values())))
        st = run.status
        return {
            "run-id": str(run.run_id),
            "fab-id": run.fab_id,
            "fab-version": run.fab_version,
            "status": f"{st.status}:{st.sub_status}" if st.sub_status else st.status,
            "status-details": st.details,
            "pending-at": run.pending_at,
            "starting-at": run.starting_at,
            "running-at": run.running_at,
            "finished-at": run.finished_at,
        }

    def wait(self, run_id: int, timeout: float = 600.0, poll: float = 2.0,
             via: str = "api") -> dict[str, Any]:
        """Poll until the run's status starts with ``finished`` (or timeout)."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while True:
            self.poll()
            try:
                info = self.run_info(run_id, via=via)
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(poll)
                continue
            if str(info.get("status", "")).startswith("finished"):
                return info
            if time.monotonic() >= deadline:
                return info
            time.sleep(poll)

    def logs(self, run_id: int, timeout: float | None = None) -> str:
        """``flwr log RUN_ID CONNECTION --show`` (ServerApp logs kept by the SuperLink)."""
        res = self.flwr("log", str(run_id), CONNECTION_NAME, "--show", timeout=timeout, check=False)
        return res.stdout

    def stop_run(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), CONNECTION_NAME, check=False)

    def run(self, app_dir: str | os.PathLike[str], run_config: Mapping[str, Any] | None = None,
            timeout: float = 600.0, poll: float = 2.0, federation: str | None = None,
            stop_on_timeout: bool = True, via: str = "api") -> RunResult:
        """Submit a run (``flwr run``), wait for it to finish, return status + logs.

        ``via`` selects how the status is polled: ``"api"`` (in-process Control API
        ``ListRuns``, cheap) or ``"cli"`` (``flwr ls --format json``).
        """
        t0 = time.monotonic()
        run_id = self.submit(app_dir, run_config, federation)
        info = self.wait(run_id, timeout=timeout, poll=poll, via=via)
        status = str(info.get("status", ""))
        timed_out = not status.startswith("finished")
        if timed_out and stop_on_timeout:
            self.stop_run(run_id)
        return RunResult(
            run_id=run_id,
            status=status,
            details=str(info.get("status-details", "")),
            logs=self.logs(run_id),
            elapsed_s=time.monotonic() - t0,
            timed_out=timed_out,
            run_info=info,
        )

    # ------------------------------------------------------------------ killing
    def _component_pids(self, name: str | None) -> set[int]:
        """Live pids belonging to component ``name`` (None = whole deployment)."""
        table = proc_table()
        needle = (
            f"{TAG_COMPONENT}={name}".encode() if name else f"{TAG_DEPLOY}={self.deploy_id}".encode()
        )
        deploy_needle = f"{TAG_DEPLOY}={self.deploy_id}".encode()
        pids = {
            pid for pid in table
            if environ_has(pid, needle) and (name is None or environ_has(pid, deploy_needle))
        }
        mains = [p.popen.pid for n, p in self._procs.items() if name is None or n == name]
        for pid in mains:
            if pid in table:
                pids.add(pid)
                pids |= descendants(pid, table)
        pids.discard(os.getpid())
        return {p for p in pids if pid_alive(p)}

    def _stop_component(self, name: str | None, sig: int) -> None:
        pids = self._component_pids(name)
        signal_pids(pids, sig)
        # every process signalled, until it is gone: one that is exiting has already lost the environment
        # that tags it (its memory goes first), so the tagged search no longer finds it while it still runs
        signalled = set(pids)
        deadline = time.monotonic() + (self.kill_grace if sig != signal.SIGKILL else 5.0)
        while True:
            self._reap(name)
            pids = self._component_pids(name) | {p for p in signalled if pid_alive(p)}
            signalled |= pids
            if not pids:
                break
            if time.monotonic() >= deadline:
                signal_pids(pids, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
                sig = signal.SIGKILL
            time.sleep(0.05)
        self._reap(name)
        for n in [n for n in self._procs if name is None or n == name]:
            del self._procs[n]

    def _reap(self, name: str | None) -> None:
        for n, p in self._procs.items():
            if name is None or n == name:
                try:
                    p.popen.wait(timeout=0)
                except subprocess.TimeoutExpired:
                    pass

    def close(self) -> None:
        """Stop every process of this deployment (SIGTERM, then SIGKILL); idempotent."""
        try:
            # SuperNodes first so they can deregister while the SuperLink still runs.
            names = [n for n in self._procs if n.startswith("supernode")]
            names += [n for n in self._procs if n not in names]
            for name in names:
                # keep going on errors: the sweep below kills whatever is left
                with contextlib.suppress(Exception):
                    self._stop_component(name, signal.SIGTERM)
        finally:
            # Final sweep for anything still carrying this deployment's tag.
            self._stop_component(None, signal.SIGKILL)
            ctl = getattr(self, "_ctl", None)
            if ctl is not None:
                with contextlib.suppress(Exception):
                    ctl.close()
                self._ctl = None
            self._closed = True
            if self._atexit_registered:
                atexit.unregister(self.close)
                self._atexit_registered = False


def _parse_json(text: str) -> dict[str, Any] | None:
    """Parse the (last) JSON object printed by the flwr CLI."""
    text = text.strip()
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    start = text.find("{")
    while start != -1:
        try:
            obj = json.loads(text[start:])
            return obj if isinstance(obj, dict) else None
        except ValueError:
            start = text.find("{", start + 1)
    return None
