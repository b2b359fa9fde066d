"""Which SuperNode may serve which client: each client id is bound to one SuperNode public key.

A SuperNode says which client it serves (its answer to the server's QUERY message, from its
node config), and anyone who can reach the SuperLink's Control API can register a key and
start a SuperNode that says "client 0" (docs/security.md, "Who may join a federation"). With
`federation.client_keys` set, the ServerApp takes such a claim only if the public key that the
SuperLink holds for the node is the one the keys file gives for that client; any other node
gets no message of the run.

The key comes from Flower itself: `Grid.get_nodes()` returns each online node's `NodeInfo`
with the `public_key` it was registered with, and the SuperLink accepts a Fleet request for a
node id only if it is signed with the private key registered for that id
(flwr/superlink/routers/fleet/node_auth.py, `authenticate_node`). So only the holder of the
private key of client c's SuperNode can pull the messages sent to the node bound to c, and the
SuperNode's private key never has to be shown to app code. Nothing here needs a Flower process:
the checks take plain values and are tested on their own.

The keys file (text, UTF-8), one client per line, `#` comments and blank lines ignored::

    # <client id> <the SuperNode's public key, OpenSSH format, as in its KEY.pub>
    0 ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABh... supernode-0
    1 /etc/fedlrm/keys/supernode-1.pub

The key is the `.pub` line itself or the path of such a file (relative paths are read against
the keys file's folder). Keys are EC keys on a NIST curve (P-256, P-384, P-521): what
`flwr supernode register` accepts. A client has one key; a key serves one client.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlrm.errors import ConfigError

__all__ = ["ClientKeys", "Verdict", "canonical_key", "claimed_client", "fingerprint", "format_client_keys",
           "judge", "read_client_keys", "write_client_keys"]

KEY_SETTING = "federation.client_keys"
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_OPENSSH_PREFIXES = ("ecdsa-sha2-", "ssh-", "sk-", "rsa-sha2-")  # a key line, not a path


@dataclass(frozen=True)
class ClientKeys:
    """The client -> public key binding of a keys file (keys as DER SubjectPublicKeyInfo)."""

    path: Path
    keys: dict[int, bytes]

    def owner(self, key: bytes | None) -> int | None:
        """The client whose key this is (any form `canonical_key` reads), if any."""
        try:
            der = canonical_key(key) if key else None
        except ValueError:
            der = None
        return next((c for c, k in self.keys.items() if k == der), None) if der else None


@dataclass(frozen=True)
class Verdict:
    """What the server makes of one SuperNode's answer to "which client are you"."""

    node: int
    claimed: int | None  # the client the node says it serves (None: no usable answer)
    client: int | None  # the client it is bound to; None: refused, it gets no message
    reason: str  # why it was refused ("" when bound)
    key: str | None = None  # the fingerprint of the key the SuperLink holds for it

    @property
    def ok(self) -> bool:
        return self.client is not None


# ----------------------------------------------------------------------------- keys
def _check_ec(key: Any, where: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{where}: a {type(key).__name__.removeprefix('_')} is no SuperNode key; Flower's SuperNode "
                         f"authentication uses EC keys on a NIST curve (e.g. ssh-keygen -t ecdsa -b 384)")
    if key.curve.name not in NIST_CURVES:
        raise ValueError(f"{where}: curve {key.curve.name} is not one of {', '.join(NIST_CURVES)}")
    return key


def canonical_key(data: bytes | str) -> bytes:
    """A public key (one OpenSSH line, PEM or DER) as DER SubjectPublicKeyInfo, the form keys are
    compared in: Flower stores PEM (`public_key_to_bytes`), the keys file holds OpenSSH lines.
    Raises ValueError for anything that is not an EC public key on a NIST curve."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    stripped = raw.strip()
    try:
        if stripped.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(stripped)
        elif stripped.startswith(tuple(p.encode() for p in _OPENSSH_PREFIXES)):
            key = serialization.load_ssh_public_key(stripped)
        else:
            key = serialization.load_der_public_key(raw)
    except Exception as err:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise ValueError(f"not a public key ({err})") from None
    return _check_ec(key, "public key").public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(der: bytes) -> str:
    """`SHA256:...` as `ssh-keygen -lf KEY.pub` prints it, so an operator can match the logs to a file."""
    key = serialization.load_der_public_key(der)
    blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_client_keys(path: str | Path) -> ClientKeys:
    """The keys file of `federation.client_keys` (format: module docstring); ConfigError naming the
    line for anything wrong in it."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{KEY_SETTING}={path}: cannot read it ({reason}); give the file that binds each client "
                          f"id to its SuperNode's public key (docs/security.md), or null to leave SuperNodes "
                          f"unchecked") from None
    keys: dict[int, bytes] = {}
    first_line: dict[int, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        at = f"{path}:{number}"
        fields = line.split(None, 1)
        if len(fields) < 2 or not re.fullmatch(r"\d+", fields[0]):
            raise ConfigError(f"{at}: expected `<client id> <public key or .pub file>`, e.g. "
                              f"`0 ecdsa-sha2-nistp384 AAAA... supernode-0`; got {line[:80]!r}")
        client, value = int(fields[0]), fields[1].strip()
        if value.startswith(_OPENSSH_PREFIXES):
            key_text, source = value, at
        else:
            key_path = (path.parent / Path(value).expanduser()).resolve()
            try:
                key_text = key_path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{at}: cannot read the key file {key_path} of client {client} ({err})") from None
            source = f"{at} ({key_path})"
        try:
            der = canonical_key(key_text)
        except ValueError as err:
            raise ConfigError(f"{source}: the key of client {client} is unusable: {err}; give the SuperNode's "
                              f"public key as its KEY.pub holds it (OpenSSH format)") from None
        if client in keys:
            raise ConfigError(f"{at}: client {client} has a key already (line {first_line[client]}); a client is "
                              f"served by one SuperNode, with one key")
        other = next((c for c, k in keys.items() if k == der), None)
        if other is not None:
            raise ConfigError(f"{at}: the key of client {client} is that of client {other} (line "
                              f"{first_line[other]}); each SuperNode serves one client, so each needs its own key")
        keys[client], first_line[client] = der, number
    if not keys:
        raise ConfigError(f"{KEY_SETTING}={path} binds no client to a key (only comments or blank lines); add "
                          f"`<client id> <public key>` lines, or set null to leave SuperNodes unchecked")
    return ClientKeys(path, keys)


def format_client_keys(keys: Mapping[int, str | Path]) -> str:
    """A keys file's text for `client -> .pub file` (each file's key is copied in)."""
    lines = ["# fedlrm client keys: <client id> <the SuperNode's public key (OpenSSH)>; see docs/security.md"]
    for client in sorted(keys):
        key_line = Path(keys[client]).read_text(encoding="utf-8").strip()
        canonical_key(key_line)  # refuse to write a file that would not load
        lines.append(f"{int(client)} {key_line}")
    return "\n".join(lines) + "\n"


def write_client_keys(path: str | Path, keys: Mapping[int, str | Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_client_keys(keys), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- claims
def claimed_client(record: Any, num_clients: int) -> tuple[int | None, str]:
    """The client id in a node's answer (its metrics record's "client") and "" - or None and what
    is wrong with it. A node may send anything; nothing here raises."""
    try:
        if record is None or not hasattr(record, "get"):
            return None, "its answer has no metrics record"
        value = record.get("client")
    except Exception as err:  # a record that fails to read is no answer
        return None, f"its answer cannot be read ({type(err).__name__})"
    if value is None:
        return None, "its answer names no client"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"its answer's client is a {type(value).__name__}, not a client id"
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        return None, f"its answer's client {value!r} is not a client id"
    client = int(value)
    if not 0 <= client < num_clients:
        return client, f"the run has no client {client} (data.num_clients={num_clients})"
    return client, ""


def judge(node: int, node_key: bytes | None, record: Any, num_clients: int, keys: ClientKeys | None,
          error: str | None = None) -> Verdict:
    """Bind `node` to the client it claims, or refuse it.

    `node_key`: the public key the SuperLink reports for the node (NodeInfo.public_key);
    `record`: its answer's metrics record; `error`: why there is no answer, if there is none.
    Without `keys` (federation.client_keys unset) a well-formed claim is taken as it is.
    """
    der: bytes | None = None
    if node_key:
        try:
            der = canonical_key(node_key)
        except ValueError:
            der = None
    printed = fingerprint(der) if der else None
    claimed, problem = (None, f"its query failed: {error}") if error is not None else \
        claimed_client(record, num_clients)
    if problem:
        return Verdict(node, claimed, None, problem, printed)
    assert claimed is not None
    if keys is None:
        return Verdict(node, claimed, claimed, "", printed)
    if der is None:
        return Verdict(node, claimed, None, "the SuperLink reports no usable public key for it, so its claim "
                                            "cannot be checked", printed)
    expected = keys.keys.get(claimed)
    if expected is None:
        return Verdict(node, claimed, None, f"{keys.path} gives no key for client {claimed}", printed)
    if der != expected:
        owner = keys.owner(der)
        why = (f"its key is that of client {owner}" if owner is not None
               else f"its key {printed} is not the one {keys.path} gives for client {claimed}")
        return Verdict(node, claimed, None, why, printed)
    return Verdict(node, claimed, claimed, "", printed)
