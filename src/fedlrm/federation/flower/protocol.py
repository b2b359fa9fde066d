"""How fedlrm's messages travel inside Flower messages.

A message carries the algorithm's tensors as an `ArrayRecord` ("state") and the rest as a
`ConfigRecord` ("fedlrm"): the round, the client (partition) it is meant for, the run's
key and the whole run configuration, so a SuperNode needs nothing but its data to take
part. Replies carry the client's tensors as "state" and figures as a `MetricRecord`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlrm.errors import DataError

if TYPE_CHECKING:
    from fedlrm.algorithms import State
    from fedlrm.config import RunConfig

# The imports of torch and the configuration stay inside the functions that need them: the
# ClientApp answers a query with `reply` alone, without importing torch.

STATE, META, METRICS, INFO = "state", "fedlrm", "metrics", "info"


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


def request(payload: bytes, **fields) -> RecordDict:
    return RecordDict({STATE: pack_state(payload), META: ConfigRecord(request_fields(**fields))})


def read_fields(meta: dict) -> tuple[dict, RunConfig]:
    from fedlrm.algorithms import config_from_dict

    return dict(meta), config_from_dict(json.loads(str(meta["run-config"])))


def read_request(message: Message) -> tuple[dict, RunConfig, bytes]:
    meta, cfg = read_fields(message.content[META])
    return meta, cfg, unpack_state(message.content.get(STATE))


def reply(message: Message, upload: State | None = None, **metrics: float) -> Message:
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
    content = RecordDict({METRICS: MetricRecord(numbers), INFO: ConfigRecord(texts)})
    if upload is not None:
        content[STATE] = ArrayRecord(torch_state_dict=upload) if upload else ArrayRecord()
    return Message(content, reply_to=message)


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


def client_id_of(node_config) -> int:
    """The client a SuperNode serves, from its node config."""
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    if "client-id" in node_config:
        return int(node_config["client-id"])
    raise DataError("this SuperNode's node config names neither `partition-id` (with `num-partitions`) nor "
                    "`client-id` (with `data-dir`); start it with e.g. --node-config 'partition-id=0 num-partitions=3'")
