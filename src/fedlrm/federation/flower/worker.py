"""A long-lived process per SuperNode that does its ClientApps' work (deployment runtime).

Flower 1.41 starts a new `flwr-clientapp` process for every message. Importing torch and
transformers and building the model costs such a process about 4 s of CPU, more than a
client's round of work on the built-in default. So a ClientApp that must train or evaluate
hands the message to its SuperNode's worker: a process that the first such message starts
and later ones reuse. It keeps the model it built for the run and the client's images
(`node`'s caches, as an actor of the Simulation Runtime does); private state stays on disk
as before, so a worker that dies loses nothing but its caches. The ClientApp itself then
imports neither torch nor transformers. Node config `worker=false` turns it off.

The worker listens on a Unix socket in a folder that only its user may enter, answers only
peers of its own user (SO_PEERCRED), serves one message at a time (a SuperNode processes
one at a time), and exits when the SuperNode's SuperExec that started its first ClientApp
is gone (a restarted SuperNode starts a new one), or after `worker-idle-seconds` (node
config, default 600) without a message.

Frames on the socket: an 8-byte length and a JSON header, then an 8-byte length and the
concatenated contents of the Flower objects the header lists (a RecordDict and its
records, as Flower itself ships them between processes).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fedlrm.errors import FedLRMError

DEFAULT_IDLE_SECONDS = 600.0
START_TIMEOUT = 300.0  # a worker imports torch and transformers before it listens; a loaded host is slow
_LENGTH = struct.Struct(">Q")


# ----------------------------------------------------------------------------- frames
def _send(conn: socket.socket, header: dict, blob: bytes = b"") -> None:
    data = json.dumps(header).encode()
    conn.sendall(_LENGTH.pack(len(data)) + data + _LENGTH.pack(len(blob)) + blob)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other end closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(conn: socket.socket) -> tuple[dict, bytes]:
    header = json.loads(_read_exactly(conn, _LENGTH.unpack(_read_exactly(conn, 8))[0]))
    return header, _read_exactly(conn, _LENGTH.unpack(_read_exactly(conn, 8))[0])


def pack_records(content) -> tuple[dict, bytes]:
    """A RecordDict as (the header's part, the bytes): its object tree, deflated as Flower does."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    return {"root": content.object_id, "sizes": [[oid, len(b)] for oid, b in objects.items()]}, \
        b"".join(objects.values())


def unpack_records(header: dict, blob: bytes):
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents, at = {}, 0
    for oid, size in header["sizes"]:
        contents[oid] = blob[at:at + size]
        at += size
    return inflate_object_from_contents(header["root"], contents)


# ----------------------------------------------------------------------------- the ClientApp's side
def socket_path(state_dir: Path) -> Path:
    """Where the worker of `state_dir` listens: a short path (Unix sockets take ~100 bytes) in a
    folder of this user's only."""
    folder = Path(tempfile.gettempdir()) / f"fedlrm-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not folder.is_dir() or folder.is_symlink():
        raise FedLRMError(f"{folder} is not a folder of this user's only (mode {oct(info.st_mode & 0o777)}); "
                          f"remove it, or turn the ClientApp worker off with node config worker=false")
    return folder / (hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:24] + ".sock")


def enabled(node_config) -> bool:
    """Whether this ClientApp hands its work to a worker: in a `flwr-clientapp` process (the
    deployment runtime; an actor of the Simulation Runtime is long-lived already) unless the node
    config says worker=false."""
    wanted = str(node_config.get("worker", "true")).lower() not in ("false", "0", "no", "off")
    return wanted and Path(sys.argv[0]).name == "flwr-clientapp"


def call(kind: str, content, context, state_dir: Path, watch: int | None = None):
    """Have the worker of `state_dir` do `kind` (train, evaluate, secure-train) with a message's
    content; its reply's content (a RecordDict). Starts the worker if none answers. `watch`: the
    process whose end ends the worker (default: this process's parent, the SuperExec)."""
    watch = os.getppid() if watch is None else watch
    header, blob = pack_records(content)
    header.update(kind=kind, watch=watch, context={
        "run_id": int(context.run_id), "node_id": int(context.node_id), "node_config": dict(context.node_config),
        "run_config": dict(context.run_config)})
    path = socket_path(state_dir)
    for _ in range(2):  # a worker of a SuperExec that is gone answers "stale" and ends: start another
        conn = _connect_or_start(path, state_dir, watch, float(context.node_config.get("worker-idle-seconds",
                                                                                        DEFAULT_IDLE_SECONDS)))
        with conn:
            _send(conn, header, blob)
            answer, data = _receive(conn)
        if answer.get("stale"):
            _wait_gone(path, 10.0)
            continue
        if not answer.get("ok"):
            raise FedLRMError(f"the ClientApp worker failed: {answer.get('error')}")
        return unpack_records(answer, data)
    raise FedLRMError("the ClientApp worker could not be started for this SuperNode's SuperExec")


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _wait_gone(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _connect_or_start(path: Path, state_dir: Path, watch: int, idle: float) -> socket.socket:
    conn = _connect(path)
    if conn is not None:
        return conn
    with open(path.with_suffix(".lock"), "w") as lock:  # one starter at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        path.unlink(missing_ok=True)  # a socket file that nobody answers: a worker that died
        state_dir.mkdir(parents=True, exist_ok=True)
        log = open(state_dir / "worker.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "fedlrm.federation.flower.worker", "--socket", str(path),
                                    "--watch", str(watch), "--idle", str(idle)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if process.poll() is not None:
                tail = (state_dir / "worker.log").read_text(errors="replace")[-2000:]
                raise FedLRMError(f"the ClientApp worker exited with status {process.returncode} before it "
                                  f"listened ({state_dir / 'worker.log'}):\n{tail}")
            time.sleep(0.05)
        process.kill()
        raise FedLRMError(f"the ClientApp worker did not listen within {START_TIMEOUT:.0f} s")


# ----------------------------------------------------------------------------- the worker
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _handle(header: dict, blob: bytes):
    from flwr.app import Context, RecordDict

    from fedlrm.federation.flower import node

    content = unpack_records(header, blob)
    ctx = header["context"]
    context = Context(run_id=ctx["run_id"], node_id=ctx["node_id"], node_config=ctx["node_config"],
                      state=RecordDict(), run_config=ctx["run_config"])
    work = {"train": node.train, "evaluate": node.evaluate, "secure-train": node.train_for_secure_aggregation}
    return work[header["kind"]](content, context)


def serve(path: Path, watch: int, idle: float) -> None:
    import fedlrm.federation.flower.node  # noqa: F401  torch, the algorithms: before listening, not per message

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file: this user only
    try:
        listener.bind(str(path))
    except OSError as err:  # another worker won the race: it serves
        print(f"not serving {path}: {err}", file=sys.stderr)
        return
    finally:
        os.umask(old_umask)
    inode = path.stat().st_ino
    listener.listen(4)
    listener.settimeout(1.0)
    last = time.monotonic()
    print(f"worker {os.getpid()} serving {path} for SuperExec {watch}", file=sys.stderr, flush=True)
    try:
        while _alive(watch) and time.monotonic() - last < idle:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if _peer_uid(conn) != os.getuid():
                    continue  # another user's process: no answer
                try:
                    header, blob = _receive(conn)
                except (ConnectionError, ValueError, struct.error):
                    continue
                if header.get("watch") != watch:  # a restarted SuperNode's ClientApp: it starts its own worker
                    _send(conn, {"stale": True})
                    break
                try:
                    reply, data = pack_records(_handle(header, blob))
                    reply["ok"] = True
                except Exception as err:  # the ClientApp reports it to the server as Flower's error reply
                    traceback.print_exc()
                    reply, data = {"ok": False, "error": f"{type(err).__name__}: {err}"}, b""
                with contextlib.suppress(OSError):
                    _send(conn, reply, data)
            last = time.monotonic()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:  # still ours, not a newer worker's
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="fedlrm's ClientApp worker (started by the ClientApp itself)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--watch", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_SECONDS, help="exit after so many idle seconds")
    args = parser.parse_args()
    serve(Path(args.socket), args.watch, args.idle)


if __name__ == "__main__":
    main()
