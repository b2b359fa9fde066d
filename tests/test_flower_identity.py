"""Client identities bound to SuperNode keys (issue 14, point 4).

The attack: with SuperNode authentication on, anyone holding only the public CA certificate
registered a key of their own through the SuperLink's Control API (`flwr supernode register`),
started a SuperNode with `partition-id=0` and received client 0's messages. With
`federation.client_keys` the ServerApp binds a node to the client it claims only if the
SuperLink holds that client's key for it.

The unmarked tests check the keys file, the claim parsing and FlowerTransport.nodes() against a
fake Grid (no Flower process); the `flower` test replays the attack on a real deployment.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Error
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fedlrm.algorithms import load_config
from fedlrm.errors import ConfigError
from fedlrm.federation.flower.identity import (canonical_key, claimed_client, fingerprint, judge,
                                              read_client_keys, write_client_keys)
from fedlrm.federation.wire import encode
from fedlrm.tools.certs import generate_supernode_keys


# ----------------------------------------------------------------------------- helpers
def flower_pem(pub_path: Path) -> bytes:
    """The key as the SuperLink stores it (and NodeInfo.public_key carries it): what
    `flwr supernode register` sends, flwr.cli.supernode.register.try_load_public_key."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return public_key_to_bytes(serialization.load_ssh_public_key(pub_path.read_bytes()))


@pytest.fixture
def keys(tmp_path):
    """Three SuperNode key pairs: client 0's, client 1's and a stranger's."""
    return {name: generate_supernode_keys(tmp_path / "keys", name) for name in ("supernode-0", "supernode-1", "rogue")}


@pytest.fixture
def keys_file(tmp_path, keys):
    return write_client_keys(tmp_path / "client_keys", {0: keys["supernode-0"].public_key,
                                                        1: keys["supernode-1"].public_key})


def claim(client) -> MetricRecord:
    return MetricRecord({"client": client})


# ----------------------------------------------------------------------------- the keys file
def test_the_keys_file_binds_each_client_to_the_key_flower_holds_for_its_supernode(tmp_path, keys, keys_file):
    loaded = read_client_keys(keys_file)
    assert sorted(loaded.keys) == [0, 1]
    for client in (0, 1):  # an OpenSSH line and Flower's PEM name the same key
        assert loaded.keys[client] == canonical_key(flower_pem(keys[f"supernode-{client}"].public_key))
    assert loaded.owner(flower_pem(keys["supernode-1"].public_key)) == 1
    assert loaded.owner(flower_pem(keys["rogue"].public_key)) is None
    assert loaded.owner(b"") is None and loaded.owner(b"garbage") is None

    # a .pub file by path (relative to the keys file), comments and blank lines
    (tmp_path / "by_path").write_text(f"# fedlrm client keys\n\n3   keys/supernode-1.pub\n0 "
                                      f"{keys['supernode-0'].public_key.read_text().strip()}\n")
    assert read_client_keys(tmp_path / "by_path").keys == {3: loaded.keys[1], 0: loaded.keys[0]}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprints_are_those_ssh_keygen_prints(keys):
    pub = keys["supernode-0"].public_key
    printed = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True).stdout
    assert fingerprint(canonical_key(pub.read_text())) == printed.split()[1]


def _key_line(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize("text, message", [
    ("zero {k0}\n", r"client_keys:1: expected `<client id> <public key or \.pub file>`"),
    ("-1 {k0}\n", "expected `<client id>"),
    ("0\n", "expected `<client id>"),
    ("0 {k0}\n# a comment\n0 {k1}\n", r"client_keys:3: client 0 has a key already \(line 1\)"),
    ("0 {k0}\n1 {k0}\n", r"client_keys:2: the key of client 1 is that of client 0 \(line 1\)"),
    ("0 {ed}\n", "the key of client 0 is unusable: .*no SuperNode key"),
    ("0 {k256k1}\n", "unusable"),
    ("0 ecdsa-sha2-nistp384 AAAAnotbase64\n", "unusable: not a public key"),
    ("0 missing.pub\n", "cannot read the key file .*missing.pub of client 0"),
    ("# nothing but a comment\n\n", "binds no client to a key"),
])
def test_a_bad_keys_file_is_refused_naming_the_line(tmp_path, keys, text, message):
    k0, k1 = (keys[f"supernode-{i}"].public_key.read_text().strip() for i in (0, 1))
    ed = _key_line(ed25519.Ed25519PrivateKey.generate())
    try:
        k256k1 = _key_line(ec.generate_private_key(ec.SECP256K1()))
    except Exception:  # OpenSSH has no name for secp256k1: the file cannot even hold it
        k256k1 = ed
    path = tmp_path / "client_keys"
    path.write_text(text.format(k0=k0, k1=k1, ed=ed, k256k1=k256k1))
    with pytest.raises(ConfigError, match=message):
        read_client_keys(path)


def test_a_missing_keys_file_and_an_empty_setting_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"federation.client_keys=.*nowhere: cannot read it"):
        read_client_keys(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="federation.client_keys is empty"):
        load_config(None, ["federation.client_keys=''"])


def test_the_local_deployment_writes_the_keys_of_its_own_supernodes(tmp_path):
    from fedlrm.tools.deployment import DeploymentError, LocalDeployment

    nodes = [{"partition-id": 1}, {"client-id": 0, "data-dir": "/data"}]
    dep = LocalDeployment(tmp_path / "fl", 2, nodes, tls=True, auth=True)
    loaded = read_client_keys(dep.write_client_keys(tmp_path / "client_keys"))  # no process is started
    assert loaded.keys == {1: canonical_key(dep.auth_keys[0].public_key.read_text()),
                           0: canonical_key(dep.auth_keys[1].public_key.read_text())}
    with pytest.raises(DeploymentError, match="need SuperNode authentication"):
        LocalDeployment(tmp_path / "fl2", 1).write_client_keys(tmp_path / "x")
    with pytest.raises(DeploymentError, match="both serve client 0"):
        LocalDeployment(tmp_path / "fl3", 2, [{"partition-id": 0}] * 2, tls=True, auth=True).write_client_keys(
            tmp_path / "y")


# ----------------------------------------------------------------------------- claims
@pytest.mark.parametrize("record", [
    None, "client 0", 42, MetricRecord({}), ConfigRecord({"client": "0"}), MetricRecord({"client": 0.5}),
    MetricRecord({"client": math.nan}), MetricRecord({"client": math.inf}), MetricRecord({"client": [0.0]}),
    ConfigRecord({"client": True}), ConfigRecord({"client": b"\x00"}),
])
def test_a_garbage_claim_is_no_client_and_never_raises(record):
    client, problem = claimed_client(record, 3)
    assert client is None and problem


def test_a_claim_outside_the_run_is_refused_and_a_whole_float_is_a_client():
    assert claimed_client(claim(2.0), 3) == (2, "")
    assert claimed_client(ConfigRecord({"client": 1}), 3) == (1, "")
    assert claimed_client(claim(3.0), 3)[1] == "the run has no client 3 (data.num_clients=3)"
    assert "no client -1" in claimed_client(claim(-1.0), 3)[1]

    class Exploding:
        def get(self, key):
            raise RuntimeError("boom")

    assert claimed_client(Exploding(), 3) == (None, "its answer cannot be read (RuntimeError)")


def test_a_node_is_bound_only_to_the_client_whose_key_the_superlink_holds_for_it(keys, keys_file):
    loaded = read_client_keys(keys_file)
    pem = {name: flower_pem(k.public_key) for name, k in keys.items()}

    ok = judge(11, pem["supernode-0"], claim(0.0), 3, loaded)
    assert ok.ok and ok.client == 0 and ok.key.startswith("SHA256:")
    wrong_client = judge(12, pem["supernode-1"], claim(0.0), 3, loaded)  # client 1's node says it is client 0
    assert not wrong_client.ok and wrong_client.claimed == 0 and "its key is that of client 1" in wrong_client.reason
    stranger = judge(13, pem["rogue"], claim(0.0), 3, loaded)  # a key of the attacker's own, registered by them
    assert not stranger.ok and "is not the one" in stranger.reason and stranger.key in stranger.reason
    no_key = judge(14, b"", claim(0.0), 3, loaded)  # the SuperLink reports none (auth off, an old Grid)
    assert not no_key.ok and "no usable public key" in no_key.reason
    keyless_client = judge(15, pem["supernode-0"], claim(2.0), 3, loaded)  # client 2 has no key in the file
    assert not keyless_client.ok and "gives no key for client 2" in keyless_client.reason
    garbage = judge(16, pem["supernode-0"], MetricRecord({"client": math.nan}), 3, loaded)
    assert not garbage.ok and garbage.claimed is None
    failed = judge(17, pem["supernode-0"], None, 3, loaded, error="ClientApp crashed")
    assert not failed.ok and failed.reason == "its query failed: ClientApp crashed"
    # unchecked (federation.client_keys null): a well-formed claim is taken as it is, garbage is not
    assert judge(18, pem["rogue"], claim(0.0), 3, None).client == 0
    assert not judge(19, None, ConfigRecord({"client": "0"}), 3, None).ok


# ----------------------------------------------------------------------------- FlowerTransport.nodes()
class FakeGrid:
    """The part of Flower's Grid that FlowerTransport uses: online nodes with the keys the SuperLink
    holds for them, each answering the messages it is sent with its `answer(message)`."""

    def __init__(self):
        self.online: dict[int, tuple[bytes, object]] = {}
        self.pushed: list[Message] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.online)

    def get_nodes(self):
        return [NodeInfo(node_id=n, public_key=key) for n, (key, _) in self.online.items()]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pushed.append(m)
            _, answer = self.online.get(m.metadata.dst_node_id, (None, None))
            content = answer(m) if answer else None
            if content is not None:
                self.replies[m.metadata.message_id] = Message(content, reply_to=m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def sent_to(self, node: int, kind: str) -> list[Message]:
        return [m for m in self.pushed if m.metadata.dst_node_id == node and m.metadata.message_type == kind]


def node_answering(client):
    """A fedlrm ClientApp's answers, claiming `client` (whatever the keys say)."""

    def answer(message: Message):
        if message.metadata.message_type == MessageType.QUERY:
            return RecordDict({"metrics": MetricRecord({"client": client}), "info": ConfigRecord({})})
        return RecordDict({"metrics": MetricRecord({"client": client, "num_examples": 4.0}),
                           "info": ConfigRecord({})})

    return answer


@pytest.fixture
def task_identity(monkeypatch):
    """Messages made outside a Flower process need the task's run and node ids."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def transport(grid, tmp_path, keys_file=None, clients=2, wait_for=0):
    from fedlrm.federation.flower.server_app import FlowerTransport

    overrides = [f"data.num_clients={clients}", "federation.round_timeout=1", f"output_dir={tmp_path}"]
    if keys_file:
        overrides.append(f"federation.client_keys={keys_file}")
    cfg = load_config(None, overrides)
    return FlowerTransport(grid, None, cfg, "run-key", tmp_path, node_wait=0.0, wait_for=wait_for)


def rejections(tmp_path) -> list[dict]:
    path = tmp_path / "identity_rejections.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_rogue_node_never_enters_the_client_map_nor_displaces_the_genuine_one(task_identity, tmp_path, keys,
                                                                                 keys_file, caplog):
    pem = {name: flower_pem(k.public_key) for name, k in keys.items()}
    grid = FakeGrid()
    grid.online = {11: (pem["supernode-0"], node_answering(0.0)), 12: (pem["supernode-1"], node_answering(1.0))}
    t = transport(grid, tmp_path, keys_file, wait_for=2)
    assert t.nodes() == {0: 11, 1: 12}

    # newer nodes: the rogue (own key) and client 1's key both claim client 0; one sends garbage
    # and one never answers
    grid.online[13] = (pem["rogue"], node_answering(0.0))
    grid.online[14] = (pem["supernode-1"], node_answering(0.0))  # client 1's key (Flower gives a key one node id;
    # here a second one stands for client 1's SuperNode started with the wrong partition-id)
    grid.online[15] = (pem["rogue"], lambda m: RecordDict({"metrics": ConfigRecord({"client": "0; drop table"})}))
    grid.online[16] = (b"", lambda m: None)
    with caplog.at_level("WARNING", logger="fedlrm.server"):
        assert t.nodes(2) == {0: 11, 1: 12}
    refused = {r["node"]: r for r in rejections(tmp_path)}
    assert sorted(refused) == [13, 14, 15, 16]
    assert refused[13]["claimed_client"] == 0 and refused[13]["round"] == 2
    assert "is not the one" in refused[13]["reason"]
    assert "that of client 1" in refused[14]["reason"]
    assert refused[15]["claimed_client"] is None and "not a client id" in refused[15]["reason"]
    assert refused[16]["reason"].startswith("its query failed: no answer in time")
    assert all(r["time"] and (r["key"] is None or r["key"].startswith("SHA256:")) for r in refused.values())
    assert "round 2: SuperNode 13 claims client 0 and is refused" in caplog.text

    # the round's messages go to the genuine nodes only; refused nodes are not asked again
    payload = encode({"w": torch.zeros(2)})
    answers, _ = t.exchange(2, {0: payload, 1: payload}, {}, 2)
    assert sorted(answers) == [0, 1]
    assert [m.content["fedlrm"]["client"] for m in grid.sent_to(11, MessageType.TRAIN)] == [0]
    for node in (13, 14, 15, 16):
        assert not grid.sent_to(node, MessageType.TRAIN) and not grid.sent_to(node, MessageType.EVALUATE)
        assert len(grid.sent_to(node, MessageType.QUERY)) == 1
    assert len(rejections(tmp_path)) == 4  # logged once each

    # a refused node that went offline and came back (a restart, its node config fixed) is asked again
    del grid.online[14]
    t.nodes(3)
    grid.online[14] = (pem["supernode-1"], node_answering(1.0))
    del grid.online[12]
    assert t.nodes(3) == {0: 11, 1: 14}


def test_a_genuine_node_whose_query_failed_is_asked_again(task_identity, tmp_path, keys, keys_file):
    pem = flower_pem(keys["supernode-0"].public_key)
    grid = FakeGrid()
    calls = []

    def flaky(message):
        calls.append(message.metadata.message_type)
        return Error(code=0, reason="ClientApp crashed") if len(calls) == 1 else node_answering(0.0)(message)

    grid.online = {21: (pem, flaky)}
    t = transport(grid, tmp_path, keys_file)
    assert t.nodes() == {0: 21}  # the constructor's first call failed; not refused for it
    assert rejections(tmp_path) == []


def test_a_node_that_answers_its_query_late_is_bound_by_that_answer_not_asked_forever(task_identity, tmp_path):
    """A node busy with a message of a run that ended answers each query after the server stopped
    waiting: its late answer must still count, or it is asked again every round and never heard."""
    grid = FakeGrid()
    late: list[Message] = []

    def busy(message):  # no answer while the server waits; it comes later
        late.append(message)

    grid.online = {41: (b"", busy), 42: (b"", node_answering(1.0))}
    t = transport(grid, tmp_path)
    assert t.nodes() == {1: 42}
    queries = len(grid.sent_to(41, MessageType.QUERY))
    content = node_answering(0.0)(late[0])
    grid.replies[late[0].metadata.message_id] = Message(content, reply_to=late[0])
    assert t.nodes() == {0: 41, 1: 42}
    assert len(grid.sent_to(41, MessageType.QUERY)) == queries == 1  # waited for, not asked again


def test_without_keys_claims_are_taken_as_before_but_garbage_does_not_end_the_run(task_identity, tmp_path, keys,
                                                                                 caplog):
    grid = FakeGrid()
    grid.online = {31: (b"", node_answering(0.0)), 32: (b"", lambda m: RecordDict())}  # 32: no metrics at all
    with caplog.at_level("WARNING", logger="fedlrm.server"):
        t = transport(grid, tmp_path)
    assert "federation.client_keys is not set" in caplog.text
    assert caplog.text.count("federation.client_keys is not set") == 1
    assert t.nodes() == {0: 31}
    grid.online[33] = (b"", node_answering(0.0))  # unchecked: the newest node still wins, as before
    assert t.nodes() == {0: 33}
    assert [r["node"] for r in rejections(tmp_path)] == [32]


def test_a_keys_file_without_every_client_warns_and_those_clients_get_no_node(task_identity, tmp_path, keys,
                                                                             keys_file, caplog):
    pem = flower_pem(keys["supernode-0"].public_key)
    grid = FakeGrid()
    grid.online = {41: (pem, node_answering(0.0))}
    with caplog.at_level("WARNING", logger="fedlrm.server"):
        t = transport(grid, tmp_path, keys_file, clients=3)
    assert "gives no key for client(s) [2]" in caplog.text
    grid.online[42] = (flower_pem(keys["rogue"].public_key), node_answering(2.0))
    assert t.nodes(1) == {0: 41}
    assert rejections(tmp_path)[0]["claimed_client"] == 2


# ----------------------------------------------------------------------------- the attack, for real
def _flower_available() -> bool:
    return shutil.which("flower-superlink") is not None or (Path(sys.executable).parent / "flower-superlink").exists()


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "messages.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _start_rogue(dep, home: Path, state_dir: Path) -> tuple[int, subprocess.Popen, Path]:
    """What the attacker did: with only the CA certificate, register a key of their own through the
    Control API and start a SuperNode that says it is client 0. Returns (node id, process, log)."""
    from fedlrm.tools.deployment import find_free_port

    bindir = Path(sys.executable).parent
    home.mkdir(parents=True)
    ca = shutil.copy(dep.tls_paths.ca_cert, home / "ca.crt")  # public: every SuperNode has it
    (home / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
                                      f'address = "{dep.address}"\nroot-certificates = "{ca}"\n')
    key = generate_supernode_keys(home / "keys", "rogue")
    env = dep.component_env("rogue", home)  # tagged: the deployment's close() ends what it starts
    env["COLUMNS"] = "200"
    out = subprocess.run([str(bindir / "flwr"), "supernode", "register", str(key.public_key), "target", "--format",
                          "json"], env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    found = re.search(r'"node-id":\s*(\d+)', out.stdout)
    assert out.returncode == 0 and found, (out.stdout, out.stderr)  # Flower lets them register
    (home / "node_config.toml").write_text(f'partition-id = 0\nnum-partitions = 2\nstate-dir = "{state_dir}"\n')
    log = home / "rogue.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(bindir / "flower-supernode"), "--superlink", dep.address, "--root-certificates",
                                 str(ca), "--host", "127.0.0.1", "--port", str(find_free_port()), "--node-config",
                                 str(home / "node_config.toml"), "--auth-supernode-private-key", str(key.private_key)],
                                env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _wait_until(lambda: "SuperNode ID:" in log.read_text() or proc.poll() is not None, 90, "the rogue to connect")
    assert proc.poll() is None, log.read_text()
    return int(found.group(1)), proc, log


@pytest.mark.flower
@pytest.mark.skipif(not _flower_available(), reason="flwr (flower-superlink) not installed")
def test_a_rogue_supernode_with_a_key_of_its_own_gets_none_of_the_client_it_claims(tiny_overrides, tmp_path):
    from fedlrm.federation.flower import app_source
    from fedlrm.tools.deployment import LocalDeployment
    from fedlrm.tools.processes import pid_alive

    run_dir = tmp_path / "runs" / "identity"
    keys_file = tmp_path / "client_keys"
    overrides = tiny_overrides + ["algorithm=fedlrm", "train.rounds=2", "data.num_clients=2", "name=identity",
                                  f"output_dir={tmp_path / 'runs'}", f"federation.client_keys={keys_file}"]
    nodes = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / f"node{i}")} for i in range(2)]
    rogue_state = tmp_path / "rogue-state"
    rogue_state.mkdir()
    started = []
    with LocalDeployment(tmp_path / "fl", 2, nodes, tls=True, auth=True) as dep:
        dep.write_client_keys(keys_file)  # what `fedlrm flower --auth` does
        run_id = dep.submit(app_source(), {"overrides": " ".join(overrides), "node-wait-timeout": 90.0})
        # as in the attack, the rogue joins after round 1, a newer node claiming client 0, in time for
        # round 2's training or the final evaluation (a rogue that came too late fails the test below)
        _wait_until(lambda: sum(r["direction"] == "up" and r["kind"] == "train" for r in _records(run_dir)) >= 2,
                    600, "round 1's uploads")
        rogue_id, rogue, rogue_log = _start_rogue(dep, tmp_path / "attacker", rogue_state)
        started += dep.spawned_pids() + [rogue.pid]
        try:
            info = dep.wait(run_id, timeout=900)
            logs = dep.logs(run_id)
            started += dep.spawned_pids()
        finally:
            rogue.terminate()
            try:
                rogue.wait(timeout=15)
            except subprocess.TimeoutExpired:
                rogue.kill()
                rogue.wait()
    assert str(info["status"]) == "finished:completed", logs[-4000:]
    assert not [p for p in started if pid_alive(p)], "processes left after the deployment closed"

    # refused, logged and recorded
    refused = [json.loads(line) for line in (run_dir / "identity_rejections.jsonl").read_text().splitlines()]
    assert [r["node"] for r in refused] == [rogue_id], refused
    assert refused[0]["claimed_client"] == 0 and "is not the one" in refused[0]["reason"]
    assert refused[0]["round"] == 2  # it joined after round 1: round 2's training or the final evaluation
    assert f"SuperNode {rogue_id} claims client 0 and is refused" in logs
    assert set(re.findall(r"SuperNode (\d+) serves client (\d)", logs)) == {(str(dep.node_ids[0]), "0"),
                                                                             (str(dep.node_ids[1]), "1")}

    # the rogue was asked who it is, and got nothing else: no message, no state, no adapters
    text = rogue_log.read_text()
    assert "Receiving: query message" in text
    assert not re.search(r"Receiving: (train|evaluate) message", text), text[-3000:]
    assert list(rogue_state.rglob("*")) == []

    # the genuine client 0 trained every round and holds its private state and final adapters
    crossed = _records(run_dir)
    ups = {(r["kind"], r["round"]): r for r in crossed if (r["client"], r["direction"]) == (0, "up")}
    assert sorted(ups) == [("evaluate", 2), ("train", 1), ("train", 2)]
    assert "evaluation.accuracy" in ups[("train", 2)]["metrics"]  # round 1's evaluation came with round 2's training
    (genuine,) = (tmp_path / "node0" / "runs").iterdir()
    assert list((genuine / "client0").glob("private-round0002.safetensors"))
    assert any((genuine / "adapters").rglob("*.safetensors"))
