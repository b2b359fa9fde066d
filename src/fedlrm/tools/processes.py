"""The processes of a local deployment, found by the tag in their environment and by descent.

Every process a deployment starts carries its tag in its environment, and so do Flower's
own children (SuperExec, ServerApp, ClientApp), even those that start a session of their
own and so leave the process group; `/proc` tells who carries it and who descends from whom.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

ProcTable = dict[int, tuple[int, int, str]]


def proc_table() -> ProcTable:
    """pid -> (ppid, pgid, state) for all processes (Linux /proc)."""
    table: ProcTable = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
            rest = data[data.rindex(")") + 2 :].split()
            table[int(entry)] = (int(rest[1]), int(rest[2]), rest[0])
        except (OSError, ValueError, IndexError):
            continue
    return table


def environ_has(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
        return data[data.rindex(")") + 2 :].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return True  # no /proc: trust kill(0)


def descendants(root: int, table: ProcTable) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def kill_group(pgid: int, sig: int) -> None:
    """Signal a process group, never init's or our own."""
    if pgid <= 1 or pgid == os.getpgrp():
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Signal the given processes and the process groups that one of them leads."""
    pids = set(pids)
    table = proc_table()
    own = os.getpgrp()
    for pgid in {table[p][1] for p in pids if p in table}:
        if pgid != own and pgid in pids:  # only groups led by our processes
            kill_group(pgid, sig)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
