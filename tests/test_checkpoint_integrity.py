"""Checkpoints that know themselves: a resume refuses a config.yaml or checkpoint that is not the
run's own, with a message saying what and where, and writes nothing when it does; rejected
uploads survive a resume."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedlrm.algorithms import load_config
from fedlrm.cli import main
from fedlrm.errors import FedLRMError
from fedlrm.experiment import resume_experiment, run_experiment
from fedlrm.federation.checkpoint import FILES, MANIFEST
from fedlrm.federation.simulation import InProcessTransport
from fedlrm.federation.wire import decode, encode


def overrides(clip_dir, dataset, out) -> list[str]:
    """A seconds-long fedlrm run (private and shared weights): 3 clients, 2 rounds of 1 epoch."""
    return [f"model.name={clip_dir}", "data.source=parquet", f"data.train={dataset['train']}",
            f"data.test={dataset['test']}", "data.num_clients=3", "data.shards_per_client=2", "data.shots=4",
            "data.test_per_client=8", "train.rounds=2", "train.local_epochs=1", "train.batch_size=8",
            "train.lr=0.01", "adapter.rank=4", "fedlrm.local_rank=2", f"output_dir={out}", "seed=3",
            "algorithm=fedlrm"]


@pytest.fixture(scope="module")
def cut_run(tiny_clip_dir, tiny_dataset, tmp_path_factory) -> Path:
    """A run stopped after round 1 of 2, as an interruption leaves it (made once, copied per test)."""
    out = tmp_path_factory.mktemp("integrity")
    cfg = load_config(None, overrides(tiny_clip_dir, tiny_dataset, out) + ["name=cut"])
    return run_experiment(cfg, progress=False, stop_after_round=1).run_dir


@pytest.fixture
def run_dir(cut_run, tmp_path) -> Path:
    copy = tmp_path / "cut"
    shutil.copytree(cut_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: a file's sha256, or 'dir'."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def refused(run_dir: Path, message: str) -> str:
    """Resuming `run_dir` is refused with a FedLRMError matching `message`, and changes nothing there."""
    before = snapshot(run_dir)
    with pytest.raises(FedLRMError, match=message) as err:
        resume_experiment(run_dir, progress=False)
    assert snapshot(run_dir) == before, "a refused resume wrote into the run directory"
    return str(err.value)


def ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoint"


def reseal(run_dir: Path, round_index: int | None = None) -> None:
    """Make the manifest agree with the files again (as a crafted or buggy checkpoint would), so
    the checks behind the checksums are reached."""
    manifest = json.loads((ckpt(run_dir) / MANIFEST).read_text())
    manifest["files"] = {name: hashlib.sha256((ckpt(run_dir) / name).read_bytes()).hexdigest() for name in FILES}
    for entry in manifest["client_states"].values():
        entry["sha256"] = hashlib.sha256((run_dir / "client_states" / entry["file"]).read_bytes()).hexdigest()
    if round_index is not None:
        manifest["round"] = round_index
    (ckpt(run_dir) / MANIFEST).write_text(json.dumps(manifest))


def edit_state(run_dir: Path, change) -> None:
    path = ckpt(run_dir) / "state.json"
    state = json.loads(path.read_text())
    state = change(state)
    path.write_text(json.dumps(state))


def edit_tensors(run_dir: Path, name: str, change) -> None:
    path = ckpt(run_dir) / name
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def state_file(run_dir: Path, client: int) -> Path:
    """The file of `client`'s private state that the checkpoint names."""
    manifest = json.loads((ckpt(run_dir) / MANIFEST).read_text())
    return run_dir / "client_states" / manifest["client_states"][str(client)]["file"]


def edit_client_state(run_dir: Path, client: int, change) -> None:
    path = state_file(run_dir, client)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # in the tensor data, past the header
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- the run's config.yaml
def cut_to_20_lines(text: str) -> str:
    return "\n".join(text.splitlines()[:20]) + "\n"


@pytest.mark.parametrize("change,message", [
    (cut_to_20_lines, r"config\.yaml lacks \d+ of the run's settings \(e\.g\. .*\): it is cut short or was edited"),
    (lambda text: "", r"config\.yaml is empty, and a resumed run must not take defaults"),
    (lambda text: text.replace("\nseed: 3\n", "\nseed: 4\n"),
     r"not the one the checkpoint .* was made with \(seed is 4 here, was 3\)"),
    (lambda text: text.replace("num_clients: 3", "num_clients: 10"),
     r"not the one the checkpoint .* was made with \(data\.num_clients is 10 here, was 3\)"),
    (lambda text: text + "seed: [\n", r"is not valid YAML"),
], ids=["cut-to-20-lines", "empty", "seed", "num-clients", "not-yaml"])
def test_a_config_yaml_that_is_not_the_runs_is_refused(run_dir, change, message):
    path = run_dir / "config.yaml"
    path.write_text(change(path.read_text()))
    text = refused(run_dir, message)
    assert "put back the config.yaml" in text


# ---------------------------------------------------------------------------- the checkpoint's files
def test_a_bit_flip_in_a_checkpoint_tensor_is_refused(run_dir):
    flip_bit(ckpt(run_dir) / "global.safetensors")
    text = refused(run_dir, r"global\.safetensors has changed since the checkpoint was written \(its sha256 is not "
                            r"the one in manifest\.json\)")
    assert str(ckpt(run_dir)) in text and "put back an intact copy" in text


def test_a_bit_flip_in_a_client_state_file_is_refused(run_dir):
    flip_bit(state_file(run_dir, 1))
    text = refused(run_dir, r"client 1's private state .*client1-round1\.safetensors has changed since the "
                            r"checkpoint was written")
    assert "put back an intact copy" in text


def test_a_missing_client_state_file_is_refused(run_dir):
    state_file(run_dir, 2).unlink()
    refused(run_dir, r"client 2's private state .*client2-round1\.safetensors is missing")


def test_only_changed_client_states_are_written_and_older_files_removed(run_dir):
    """A client state is written in the round it changed, once; a client the round did not sample
    keeps its older file, and files no checkpoint names any more are removed."""
    (run_dir / "client_states" / "client9-round1.safetensors").write_bytes(b"left by a crash")
    before = {c: state_file(run_dir, c).name for c in range(3)}
    assert before == {c: f"client{c}-round1.safetensors" for c in range(3)}
    resume_experiment(run_dir, progress=False)  # round 2 samples every client: each gets a round-2 file
    assert sorted(p.name for p in (run_dir / "client_states").iterdir()) == \
        [f"client{c}-round2.safetensors" for c in range(3)]


def test_an_edited_state_json_is_refused(run_dir):
    edit_state(run_dir, lambda s: {**s, "round": 2})
    refused(run_dir, r"state\.json has changed since the checkpoint was written")


def test_a_deleted_state_json_is_refused_not_a_fresh_start(run_dir):
    (ckpt(run_dir) / "state.json").unlink()
    refused(run_dir, r"checkpoint: state\.json is missing")


def test_a_missing_manifest_is_refused(run_dir):
    (ckpt(run_dir) / MANIFEST).unlink()
    refused(run_dir, r"it has no manifest\.json \(it was written by an older fedlrm, or damaged\)")


def test_a_malformed_manifest_is_refused(run_dir):
    (ckpt(run_dir) / MANIFEST).write_text('{"format": 1, "round": ')
    refused(run_dir, r"manifest\.json cannot be read")


def test_a_manifest_of_another_format_is_refused(run_dir):
    manifest = json.loads((ckpt(run_dir) / MANIFEST).read_text())
    (ckpt(run_dir) / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    refused(run_dir, r"is of format 99; this fedlrm reads format 2")


def test_a_file_added_to_the_checkpoint_is_refused(run_dir):
    (ckpt(run_dir) / "notes.txt").write_text("hello")
    refused(run_dir, r"it holds notes\.txt, which its manifest\.json does not list")


def test_a_checkpoint_folder_replaced_by_a_file_is_refused(run_dir):
    shutil.rmtree(ckpt(run_dir))
    ckpt(run_dir).write_text("not a folder")
    refused(run_dir, r"checkpoint is not a folder, so it is not the run's checkpoint")


def test_a_missing_checkpoint_after_finished_rounds_is_refused(run_dir):
    shutil.rmtree(ckpt(run_dir))
    (run_dir / "rounds.csv").write_text("round\n1\n")  # as a finished run has it
    refused(run_dir, r"has no checkpoint/ folder, but its rounds\.csv show\(s\) that rounds were done")


# ---------------------------------------------------------------------------- behind the checksums
def test_an_empty_state_json_is_refused(run_dir):
    edit_state(run_dir, lambda s: {})
    reseal(run_dir)
    refused(run_dir, r"state\.json lacks round, clients, client_rows, round_rows, rejections, max_upload_params")


def test_a_client_missing_from_state_json_is_refused(run_dir):
    edit_state(run_dir, lambda s: {**s, "clients": [0, 2]})
    reseal(run_dir)
    refused(run_dir, r"manifest\.json names the state files of clients \[0, 1, 2\], but state\.json lists "
                     r"clients \[0, 2\]")


def test_a_private_state_of_a_client_the_run_does_not_have_is_refused(run_dir):
    shutil.copy(state_file(run_dir, 0), run_dir / "client_states" / "client7-round1.safetensors")
    manifest = json.loads((ckpt(run_dir) / MANIFEST).read_text())
    manifest["client_states"]["7"] = {"file": "client7-round1.safetensors", "sha256": ""}
    (ckpt(run_dir) / MANIFEST).write_text(json.dumps(manifest))
    edit_state(run_dir, lambda s: {**s, "clients": [0, 1, 2, 7]})
    reseal(run_dir)
    refused(run_dir, r"it holds the private states of clients \[7\], but this run's clients are 0\.\.2")


@pytest.mark.parametrize("round_index", [99, 0])
def test_a_round_outside_the_runs_rounds_is_refused(run_dir, round_index):
    edit_state(run_dir, lambda s: {**s, "round": round_index})
    reseal(run_dir, round_index)
    refused(run_dir, rf"state\.json says round {round_index} was done, but this run's rounds are 1\.\.2 "
                     rf"\(train\.rounds=2\)")


def test_state_and_manifest_of_different_rounds_are_refused(run_dir):
    edit_state(run_dir, lambda s: {**s, "round": 2})
    reseal(run_dir)
    refused(run_dir, r"state\.json is of round 2 but manifest\.json of round 1")


def rename_first(prefix=""):
    def change(tensors):
        key = next(k for k in sorted(tensors) if k.startswith(prefix))
        tensors[key.replace(".A", ".Z") if ".A" in key else key + "x"] = tensors.pop(key)
    return change


def reshape_first(prefix=""):
    def change(tensors):
        key = next(k for k in sorted(tensors) if k.startswith(prefix))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    return change


def test_a_renamed_server_weight_is_refused(run_dir):
    edit_tensors(run_dir, "global.safetensors", rename_first())
    reseal(run_dir)
    refused(run_dir, r"global\.safetensors does not hold this run's server weights: 1 weight\(s\) missing, e\.g\. '")


def test_a_reshaped_server_weight_is_refused(run_dir):
    edit_tensors(run_dir, "global.safetensors", reshape_first())
    reseal(run_dir)
    refused(run_dir, r"global\.safetensors does not hold this run's server weights: '.*' is \[5, \d+\] float32, "
                     r"this model's is \[4, \d+\] float32")


def test_a_renamed_private_weight_is_refused(run_dir):
    edit_client_state(run_dir, 1, rename_first())
    reseal(run_dir)
    refused(run_dir, r"client_states/client1-round1\.safetensors does not hold client 1's private state as this "
                     r"run's model has it: 1 weight\(s\) missing")


def test_a_reshaped_private_weight_is_refused(run_dir):
    edit_client_state(run_dir, 0, reshape_first())
    reseal(run_dir)
    refused(run_dir, r"does not hold client 0's private state as this run's model has it: '.*' is \[\d+(, \d+)*\] "
                     r"float32, this model's is")


def test_a_record_for_a_method_without_one_is_refused(run_dir):
    (ckpt(run_dir) / "record.json").write_text('{"x": 1}')
    reseal(run_dir)
    refused(run_dir, r"record\.json holds a record, but fedlrm keeps none")


def test_a_server_weight_that_does_not_fit_the_model_is_refused_by_restoring(run_dir):
    edit_tensors(run_dir, "global.safetensors", lambda t: t.update({"image_encoder.nowhere.experts.global.A":
                                                                     torch.zeros(2)}))
    reseal(run_dir)
    refused(run_dir, r"client 0's model cannot be restored from it after round 1 .*nowhere")


# ---------------------------------------------------------------------------- what may still start
def test_a_run_stopped_before_round_1_finished_starts_at_round_1_and_says_so(run_dir, caplog):
    shutil.rmtree(ckpt(run_dir))
    with caplog.at_level(logging.WARNING, logger="fedlrm"):
        result = resume_experiment(run_dir, progress=False)
    assert any("has no checkpoint" in r.getMessage() and "starts at round 1" in r.getMessage() for r in caplog.records)
    assert [row["round"] for row in result.round_rows] == [1, 2]


def test_a_checkpoint_left_as_checkpoint_old_by_a_crash_between_the_renames_resumes(run_dir):
    ckpt(run_dir).rename(run_dir / "checkpoint.old")
    result = resume_experiment(run_dir, progress=False)
    assert [row["round"] for row in result.round_rows] == [1, 2]
    assert json.loads((ckpt(run_dir) / "state.json").read_text())["round"] == 2
    assert not (run_dir / "checkpoint.old").exists()


def test_a_fedlease_checkpoint_after_clustering_is_checked_in_its_new_layout(tiny_clip_dir, tiny_dataset, tmp_path):
    """After clustering, server weights are cluster experts and trained clients hold routers: both
    verify, and a router of the wrong shape does not."""
    from fedlrm.federation.checkpoint import verify_checkpoint
    from fedlrm.federation.simulation import Simulation

    cfg = load_config(None, overrides(tiny_clip_dir, tiny_dataset, tmp_path / "runs") + [
        "algorithm=fedlease", "fedlease.warmup_rounds=1", "fedlease.max_clusters=2", "train.rounds=3", "name=lease",
        "fedlease.variant=weighted"])  # the variant whose clients keep their routers privately
    cut = run_experiment(cfg, progress=False, stop_after_round=2)
    assert any("mixer" in k for k in cut.client_states[0]), "the test needs a client holding its router"
    sim = Simulation(cfg, progress=False)
    verified = verify_checkpoint(cut.run_dir, cfg, sim.server, range(3))
    assert verified.round == 2 and any(".experts.e1." in k for k in verified.server.weights)
    edit_client_state(cut.run_dir, 0, reshape_first("backbone.image_encoder.encoder.layers.0.self_attn.q_proj.mixer"))
    reseal(cut.run_dir)
    with pytest.raises(FedLRMError, match=r"does not hold client 0's private state as this run's model has it: "
                                          r"'.*mixer.*' is \[\d+, \d+\] float32, this model's is \[\d+, \d+\]"):
        verify_checkpoint(cut.run_dir, cfg, sim.server, range(3))


# ---------------------------------------------------------------------------- the other entry points
def test_the_cli_exits_2_with_the_reason_on_stderr(run_dir, capsys, cli_logging):
    flip_bit(ckpt(run_dir) / "global.safetensors")
    before = snapshot(run_dir)
    code = main(["run", "--no-progress", "--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(r"fedlrm: error: the checkpoint .*: global\.safetensors has changed since the checkpoint was "
                     r"written", err)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: flip_bit(ckpt(d) / "global.safetensors"), r"global\.safetensors has changed since"),
    (lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("\nseed: 3\n", "\nseed: 4\n")),
     r"\(seed is 4 here, was 3\)"),
], ids=["bit-flip", "seed"])
def test_the_flower_server_app_verifies_before_writing_or_waiting(run_dir, corrupt, message):
    from flwr.app import Context, RecordDict

    from fedlrm.federation.flower.server_app import main as server_main

    (run_dir / "run_key").write_text("cut-1234")
    corrupt(run_dir)
    before = snapshot(run_dir)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"resume": str(run_dir)})
    with pytest.raises(FedLRMError, match=message):
        server_main(None, context)  # no Grid: it must fail before any message would go out
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------- rejections survive a resume
def poison_client_1(monkeypatch):
    """Client 1 answers every training message with NaN, so its upload is rejected each round."""
    real = InProcessTransport.train

    def train(self, round_index, messages):
        replies = real(self, round_index, messages)
        nan = {k: torch.full_like(v, math.nan) for k, v in decode(replies[1].upload).items()}
        return {**replies, 1: replace(replies[1], upload=encode(nan))}

    monkeypatch.setattr(InProcessTransport, "train", train)


def test_rejected_uploads_survive_a_resume(tiny_clip_dir, tiny_dataset, tmp_path, monkeypatch):
    poison_client_1(monkeypatch)
    base = overrides(tiny_clip_dir, tiny_dataset, tmp_path / "runs") + ["algorithm=fedavg"]
    full = run_experiment(load_config(None, base + ["name=full"]), progress=False)
    cut = run_experiment(load_config(None, base + ["name=cut"]), progress=False, stop_after_round=1)
    assert [(x.round, x.client) for x in cut.rejections] == [(1, 1)]
    resumed = resume_experiment(cut.run_dir, progress=False)
    recorded = json.loads((cut.run_dir / "rejected_updates.json").read_text())
    with (cut.run_dir / "rounds.csv").open() as f:
        counted = sum(int(row["clients_rejected"]) for row in csv.DictReader(f))
    summary = json.loads((cut.run_dir / "summary.json").read_text())
    assert [(x["round"], x["client"]) for x in recorded] == [(1, 1), (2, 1)]
    assert resumed.summary["rejected_updates"] == summary["rejected_updates"] == len(recorded) == counted == 2
    same = lambda s: {k: v for k, v in s.items() if "seconds" not in k}
    assert same(resumed.summary) == same(full.summary)  # "uploaded" and the rejections included
