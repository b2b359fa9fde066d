"""The private states of in-process clients, most of them on disk.

A client's state is held in memory from the round it changes until the next checkpoint writes it,
then read back from its file when the client is next sampled; a client that never trained has
none stored and starts from `initial` (its state is a function of the run seed and its id). So
memory holds what the sampled clients hold, whatever the number of clients, and a checkpoint
writes only the states that changed since the last one.

The files are `client<id>-round<r>.safetensors` in the run directory's `client_states/`. A file
is written once (beside its final name, then renamed) and never changed; the checkpoint's manifest
names each client's current file with its sha256, and files no checkpoint names any more are
removed after a checkpoint is swapped in. Without a run directory every state stays in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

State = dict[str, torch.Tensor]
FOLDER = "client_states"


class PrivateStates(Mapping):
    """Client id -> private state, for each of `clients` (the initial one where none is stored)."""

    def __init__(self, clients: Sequence[int], initial: Callable[[int], State]):
        self.clients = clients
        self.initial = initial
        self.folder: Path | None = None
        self._memory: dict[int, State] = {}  # changed since the last checkpoint (all, without a folder)
        self._files: dict[int, tuple[str, str]] = {}  # on disk: (file name, sha256)

    # ------------------------------------------------------------------ the mapping
    def __getitem__(self, client: int) -> State:
        stored = self.stored_state(client)
        if stored is not None:
            return stored
        if client not in self.clients:
            raise KeyError(client)
        return self.initial(client)

    def __iter__(self) -> Iterator[int]:
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)

    def stored_state(self, client: int) -> State | None:
        """The state `client` has stored, or None if it never changed from its initial one."""
        if client in self._memory:
            return self._memory[client]
        if client in self._files:
            return load_file(self.folder / self._files[client][0])
        return None

    def stored(self) -> list[int]:
        """The clients with a stored state (in memory or on disk)."""
        return sorted(self._memory.keys() | self._files.keys())

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    def put(self, client: int, state: State) -> None:
        self._memory[client] = {k: v.detach().cpu() for k, v in state.items()}

    # ------------------------------------------------------------------ on disk
    def bind(self, folder: Path) -> None:
        """Keep the states on disk in `folder` from the next `flush` on."""
        self.folder = Path(folder)

    def flush(self, round_index: int) -> dict[int, tuple[str, str]]:
        """Write the states changed since the last flush and drop them from memory; return every
        stored client's (file name, sha256). Without a folder nothing is written or dropped."""
        if self.folder is None:
            return {}
        if self._memory:
            self.folder.mkdir(parents=True, exist_ok=True)
        for client, state in sorted(self._memory.items()):
            name = f"client{client}-round{round_index}.safetensors"
            data = save({k: v.contiguous() for k, v in state.items()})
            tmp = self.folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.folder / name)
            self._files[client] = (name, hashlib.sha256(data).hexdigest())
        self._memory.clear()
        return dict(self._files)

    def restore(self, states: Mapping[int, State]) -> None:
        """Continue from a checkpoint's states: its files (`StoredStates`, already checked) become
        this store's; states given in memory are kept as changed; {} starts every client afresh."""
        self._memory.clear()
        self._files.clear()
        self.folder = None
        if isinstance(states, StoredStates):
            self.bind(states.folder)
            self._files = dict(states.files)
        else:
            for client, state in states.items():
                self.put(client, state)

    def prune(self) -> None:
        """Remove files in the folder that no stored state refers to (older states, or those a crash
        left before their checkpoint was swapped in)."""
        if self.folder is None or not self.folder.is_dir():
            return
        keep = {name for name, _ in self._files.values()}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)


class StoredStates(Mapping):
    """The states a checkpoint names: client id -> its state, read from its file when asked for."""

    def __init__(self, folder: Path, files: dict[int, tuple[str, str]]):
        self.folder = Path(folder)
        self.files = dict(sorted(files.items()))

    def __getitem__(self, client: int) -> State:
        return load_file(self.folder / self.files[client][0])

    def __iter__(self) -> Iterator[int]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
