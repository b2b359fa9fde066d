"""pFedMoAP: each client's own prompt, other clients' prompts as fixed experts, an attention gate mixing them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlrm.adapters import adapter_parameters, get_state
from fedlrm.algorithms import ServerState, Upload, check, get_algorithm, load_config
from fedlrm.algorithms.pfedmoap import OWN, UPLOAD, PromptPool
from fedlrm.errors import ConfigError
from fedlrm.experiment import run_experiment
from fedlrm.federation.task import build_model, initial_private, load_client
from fedlrm.models import load_backbone


def setup(tiny_overrides, *extra):
    cfg = load_config(None, tiny_overrides + ["algorithm=pfedmoap", "pfedmoap.n_ctx=3", *extra])
    algorithm = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), ["red", "green", "blue"], cfg, algorithm)
    return cfg, algorithm, bundle


def pool_of(values: dict[int, float], width: int) -> dict[int, torch.Tensor]:
    return {c: torch.full((3, width), v) for c, v in values.items()}


def test_a_client_receives_the_prompts_nearest_to_its_own_and_never_its_own(tiny_overrides):
    cfg, algorithm, bundle = setup(tiny_overrides, "pfedmoap.experts=2")
    width = bundle.model.backbone.text_width()
    pool = pool_of({0: 0.0, 1: 0.5, 2: -0.2, 3: 3.0, 4: 0.1}, width)
    assert algorithm.experts_for(pool, 0, 2) == [4, 2]
    assert algorithm.experts_for(pool, 3, 2) == [1, 4]
    message = algorithm.message_for(ServerState({}, PromptPool(pool)), 0, 2)
    assert set(message) == {"prompt_context.experts.e0.ctx", "prompt_context.experts.e1.ctx"}
    assert torch.equal(message["prompt_context.experts.e0.ctx"], pool[4])
    # a client the server has no prompt of: a seeded draw of others, the same every time
    drawn = algorithm.experts_for(pool, 9, 2)
    assert len(drawn) == 2 and 9 not in drawn and drawn == algorithm.experts_for(pool, 9, 2)
    # fewer others than experts: all of them; none in the first round
    assert algorithm.experts_for(pool_of({0: 0.0, 1: 1.0}, width), 0, 2) == [1]
    assert algorithm.message_for(algorithm.init_server({}), 0, 1) == {}


def test_the_gate_mixes_the_experts_text_features_and_only_the_own_prompt_and_gate_train(tiny_overrides):
    cfg, algorithm, bundle = setup(tiny_overrides, "pfedmoap.experts=2", "pfedmoap.mix=0.3")
    model = bundle.model
    width = model.backbone.text_width()
    g = torch.Generator().manual_seed(0)
    received = {f"prompt_context.experts.e{j}.ctx": torch.randn(3, width, generator=g) for j in range(2)}
    load_client(bundle, algorithm, cfg, 0, {}, received, 2)
    assert bundle.layout == 2 and set(bundle.shared_keys) == set(received)
    assert OWN in bundle.private_keys and any(".gate." in k for k in bundle.private_keys)
    images = torch.rand(4, 3, 16, 16)
    logits = model(images)
    assert logits.shape == (4, 3)

    with torch.no_grad():  # the same logits by hand
        x = model.backbone.image_features(images)
        text = model.role_text_features()  # own prompt first, then e0, e1
        gate = model.prompt_context.gate
        q, k = gate.query(x), gate.key(text)
        a = torch.softmax(torch.einsum("bw,ekw->bke", q, k) / q.shape[-1] ** 0.5, dim=-1)
        mixed = F.normalize(torch.einsum("bke,ekd->bkd", a, text), dim=-1)
        expected = model.backbone.logit_scale * (0.7 * x @ text[0].t() + 0.3 * torch.einsum("bd,bkd->bk", x, mixed))
    torch.testing.assert_close(logits.detach(), expected)

    logits.sum().backward()
    params = adapter_parameters(model)
    assert all(params[k].grad is None for k in received)  # other clients' prompts stay as they came
    assert params[OWN].grad is not None and params[OWN].grad.abs().sum() > 0
    assert all(params[k].grad is not None for k in bundle.private_keys if ".gate." in k)
    assert all(p.grad is None for p in model.backbone.parameters())

    upload = algorithm.upload(model, bundle.shared_keys, None)
    assert set(upload) == {UPLOAD} and torch.equal(upload[UPLOAD], get_state(model, [OWN])[OWN])


def test_the_server_keeps_every_clients_latest_prompt_apart(tiny_overrides):
    cfg, algorithm, bundle = setup(tiny_overrides)
    width = bundle.model.backbone.text_width()
    state = algorithm.init_server({})
    state = algorithm.aggregate(state, [Upload(0, {UPLOAD: torch.ones(3, width)}, 10),
                                        Upload(2, {UPLOAD: torch.zeros(3, width)}, 90)], 1)
    state = algorithm.aggregate(state, [Upload(2, {UPLOAD: torch.full((3, width), 2.0)}, 90)], 2)
    assert sorted(state.record.prompts) == [0, 2]
    assert torch.equal(state.record.prompts[0], torch.ones(3, width))  # no mean: each client's own
    assert torch.equal(state.record.prompts[2], torch.full((3, width), 2.0))


def test_pfedmoap_trains_alone_in_round_one_and_with_experts_after(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=pfedmoap", "train.rounds=3", "pfedmoap.experts=1"])
    result = run_experiment(cfg, progress=False)
    down = {(m.round, m.client): m.keys for m in result.messages if m.direction == "down"}
    assert all(not keys for (r, _), keys in down.items() if r == 1)
    assert all(keys == ["prompt_context.experts.e0.ctx"] for (r, _), keys in down.items() if r > 1)
    assert sorted(result.server_state.record.prompts) == sorted(result.client_states)


@pytest.mark.parametrize("override", ["pfedmoap.experts=0", "pfedmoap.mix=1.5", "pfedmoap.gate_width=0",
                                      "pfedmoap.n_ctx=0"])
def test_bad_pfedmoap_settings_are_refused_by_name(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        check(load_config(None, ["algorithm=pfedmoap", override]))


@pytest.mark.parametrize("algorithm", ["pfedmoap", "fedotp"])
def test_a_personalized_prompt_model_exports_with_everything_its_client_scores_with(tiny_overrides, algorithm):
    """The folder rebuilds the model the client is evaluated with: its own prompt and gate, and the
    experts the final server state gives it (pFedMoAP), or both contexts (FedOTP)."""
    from fedlrm.federation.export import load_personalized

    result = run_experiment(load_config(None, tiny_overrides + [f"algorithm={algorithm}", "train.rounds=2"]),
                            progress=False)
    model = load_personalized(result.run_dir / "adapters" / "client_00")
    exported = get_state(model)
    own = result.client_states[0]
    assert own and all(torch.equal(exported[k], v) for k, v in own.items())
    if algorithm == "pfedmoap":
        pfedmoap = get_algorithm(load_config(None, tiny_overrides + ["algorithm=pfedmoap"]))
        received = pfedmoap.message_for(result.server_state, 0, 2)
        assert received and all(torch.equal(exported[k], v) for k, v in received.items())
    assert model.role_scoring == ("pooled" if algorithm == "pfedmoap" else "patches")
    assert model(torch.rand(2, 3, 16, 16)).shape[0] == 2


def test_the_example_message_of_a_timed_step_carries_the_experts(tiny_overrides):
    cfg, algorithm, bundle = setup(tiny_overrides, "pfedmoap.experts=2")
    private = initial_private(bundle, algorithm, cfg, 0)
    message = algorithm.example_message(algorithm.init_server({}), private, 0)
    load_client(bundle, algorithm, cfg, 0, private, message, 2)
    assert bundle.layout == 2 and bundle.model.role_text_features().shape[0] == 3
