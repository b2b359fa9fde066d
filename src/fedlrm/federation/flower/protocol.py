"""How fedlrm's messages travel inside Flower messages.

A message carries the algorithm's tensors as an `ArrayRecord` ("state") and the rest as a
`ConfigRecord` ("fedlrm"): the round, the client (partition) it is meant for, the run's
key and the whole run configuration, so a SuperNode needs nothing but its data to take
part. Replies carry the client's tensors as "state" and figures as a `MetricRecord`.

A training message may also carry the evaluation of the round before ("evaluate-round"; its
tensors as "evaluate-state", or "evaluate-same" when they are the training tensors): the
client evaluates first, then trains, and replies with the evaluation's figures beside the
training's, their names prefixed with EVALUATION_PREFIX. On the deployment runtime, where
every message starts a ClientApp process, that is one process per client and round.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlrm.errors import DataError

if TYPE_CHECKING:
    from fedlrm.algorithms import State
    from fedlrm.config import RunConfig

# The imports of torch and the configuration stay inside the functions that need them: the
# ClientApp answers a query with `reply` alone, without importing torch.

STATE, META, METRICS, INFO = "state", "fedlrm", "metrics", "info"
EVALUATION_STATE = "evaluate-state"
EVALUATION_PREFIX = "evaluation."


def pack_state(payload: bytes) -> ArrayRecord:
    from fedlrm.federation.wire import decode

    state = decode(payload)
    return ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in state.items()}) if state else ArrayRecord()


def unpack_state(record: ArrayRecord | None) -> bytes:
    """The wire bytes of a record's tensors, so both runtimes count and check the same thing."""
    if record is None or len(record) == 0:
        return b""
    from fedlrm.federation.wire import encode

    return encode(dict(record.to_torch_state_dict()))


def request_fields(*, round_index: int, client: int, run_key: str, cfg: RunConfig, final: bool = False) -> dict:
    from fedlrm.config import to_dict

    return {"round": round_index, "client": client, "run-key": run_key, "run-config": json.dumps(to_dict(cfg)),
            "final": final}


def request(payload: bytes, evaluation: tuple[int, bytes] | None = None, **fields) -> RecordDict:
    """A message's content; `evaluation`: (round, tensors) of an earlier round to evaluate first."""
    meta = request_fields(**fields)
    content = RecordDict({STATE: pack_state(payload)})
    if evaluation is not None:
        eval_round, eval_payload = evaluation
        meta["evaluate-round"] = eval_round
        meta["evaluate-same"] = eval_payload == payload  # most algorithms send one message in both
        if eval_payload != payload:
            content[EVALUATION_STATE] = pack_state(eval_payload)
    content[META] = ConfigRecord(meta)
    return content


def read_evaluation(content: RecordDict, meta: dict, payload: bytes) -> tuple[int, bytes] | None:
    """The earlier round a training message asks to evaluate, and its tensors; None if it asks none."""
    if "evaluate-round" not in meta:
        return None
    if meta.get("evaluate-same"):
        return int(meta["evaluate-round"]), payload
    return int(meta["evaluate-round"]), unpack_state(content.get(EVALUATION_STATE))


def read_fields(meta: dict) -> tuple[dict, RunConfig]:
    from fedlrm.algorithms import config_from_dict

    return dict(meta), config_from_dict(json.loads(str(meta["run-config"])))


def read_request(content: RecordDict) -> tuple[dict, RunConfig, bytes]:
    meta, cfg = read_fields(content[META])
    return meta, cfg, unpack_state(content.get(STATE))


def reply_content(upload: State | None = None, **metrics: float) -> RecordDict:
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
    content = RecordDict({METRICS: MetricRecord(numbers), INFO: ConfigRecord(texts)})
    if upload is not None:
        content[STATE] = ArrayRecord(torch_state_dict=upload) if upload else ArrayRecord()
    return content


def reply(message: Message, upload: State | None = None, **metrics: float) -> Message:
    return Message(reply_content(upload, **metrics), reply_to=message)


def digest(payload: bytes) -> str:
    """A short fingerprint of a payload, so both ends can show they saw the same bytes."""
    return hashlib.sha256(payload).hexdigest()[:16]


def push_and_pull(grid, messages: list[Message], timeout: float | None, poll: float = 0.2) -> list[Message]:
    """Push messages and pull replies every `poll` s until all came back or `timeout` s passed
    (None: until all). Flower's `Grid.send_and_receive` does the same but waits 3 s per pull."""
    return pull_replies(grid, {m for m in grid.push_messages(list(messages)) if m}, timeout, poll)


def pull_replies(grid, message_ids: set[str], timeout: float | None, poll: float = 0.2) -> list[Message]:
    """The replies to `message_ids` (pushed now or earlier) that arrive within `timeout` s."""
    pending = set(message_ids)
    replies: list[Message] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending and (deadline is None or time.monotonic() < deadline):
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll)
    return replies


def state_dir_of(context) -> Path:
    """Where a SuperNode keeps its client's state: its node config's state-dir; on the Simulation
    Runtime (no node configs of its own) one folder per client under the run config's
    client-state-dir; else ~/.cache/fedlrm/supernode/<partition or data folder name>."""
    node_config = context.node_config
    name = f"partition-{client_id_of(node_config)}" if "data-dir" not in node_config else \
        Path(str(node_config["data-dir"])).name
    shared = str(context.run_config.get("client-state-dir", "") or "")
    return Path(str(node_config.get("state-dir") or (Path(shared) / name if shared else
                                                      Path.home() / ".cache" / "fedlrm" / "supernode" / name))
                ).expanduser()


def client_id_of(node_config) -> int:
    """The client a SuperNode serves, from its node config."""
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    if "client-id" in node_config:
        return int(node_config["client-id"])
    raise DataError("this SuperNode's node config names neither `partition-id` (with `num-partitions`) nor "
                    "`client-id` (with `data-dir`); start it with e.g. --node-config 'partition-id=0 num-partitions=3'")
