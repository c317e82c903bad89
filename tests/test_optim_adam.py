"""Adam and AdamW after aggregation against torch.optim fed the same updates; validation; checkpoints."""
import pytest
import torch
from hypothesis import given, strategies as st

import sim
from sim.workflow.config import load_config
from reference import assert_resume_is_bitwise, run_interrupted
from sim.optim import Adam, AdamState, learning_rate, make_optimizer
from sim.simulation import Simulation

SHAPES = {"w": (7, 5), "b": (5,), "scale": (), "conv": (3, 2, 3, 3)}
SCHEDULE = dict(base=0.01, warmup_steps=5, milestones=(15, 25), decay=0.3)


def updates(steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g, dtype=torch.float64) * (1 + t % 3) for n, s in SHAPES.items()}
            for t in range(steps)]


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("options", [{}, {"betas": (0.8, 0.99), "eps": 1e-6}, {"amsgrad": True}],
                         ids=["defaults", "betas-eps", "amsgrad"])
def test_matches_torch_optim_fed_the_same_updates(name, options):
    """30 steps, weight decay, warm-up then two decays, float64: the parameters agree with torch's single-tensor
    implementation to 1e-12 (the operations are the same, in the same order)."""
    g = torch.Generator().manual_seed(0)
    start = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    weight_decay = 0.05
    ours = make_optimizer(name, options, momentum=0.9, nesterov=False, weight_decay=weight_decay)
    params, state = dict(start), ours.init(start)

    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    oracle = kind(list(torch_params.values()), lr=SCHEDULE["base"], weight_decay=weight_decay, foreach=False,
                  **options)
    for step, update in enumerate(updates(30, seed=1)):
        lr = learning_rate(step, **SCHEDULE)
        params, state = ours.step(params, update, state, lr)
        for group in oracle.param_groups:
            group["lr"] = lr
        for n, p in torch_params.items():
            p.grad = update[n].clone()
        oracle.step()
    assert state.step == 30
    for n, p in torch_params.items():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-12, atol=1e-12)
        moments = oracle.state[p]
        torch.testing.assert_close(state.exp_avg[n], moments["exp_avg"], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(state.exp_avg_sq[n], moments["exp_avg_sq"], rtol=1e-12, atol=1e-15)
        assert not torch.equal(params[n], start[n])


@given(beta1=st.floats(0.0, 0.999), beta2=st.floats(0.0, 0.9999), eps=st.floats(1e-12, 1e-2),
       weight_decay=st.floats(0.0, 0.5), lr=st.floats(1e-5, 1.0), amsgrad=st.booleans(), decoupled=st.booleans(),
       seed=st.integers(0, 2**31))
def test_matches_torch_for_any_hyperparameters(beta1, beta2, eps, weight_decay, lr, amsgrad, decoupled, seed):
    g = torch.Generator().manual_seed(seed)
    start = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    ours = Adam((beta1, beta2), eps, weight_decay, decoupled=decoupled, amsgrad=amsgrad)
    params, state = dict(start), ours.init(start)
    p = torch.nn.Parameter(start["w"].clone())
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    oracle = kind([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                  foreach=False)
    for _ in range(5):
        update = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64)}
        params, state = ours.step(params, update, state, lr)
        p.grad = update["w"].clone()
        oracle.step()
    torch.testing.assert_close(params["w"], p.detach(), rtol=1e-12, atol=1e-12)


def test_adam_and_adamw_differ_only_through_weight_decay():
    start = {"w": torch.ones(4, 3, dtype=torch.float64)}
    update = {"w": torch.full((4, 3), 0.5, dtype=torch.float64)}
    plain = [Adam(weight_decay=0.0, decoupled=d) for d in (False, True)]
    steps = [o.step(start, update, o.init(start), lr=0.1)[0]["w"] for o in plain]
    assert torch.equal(steps[0], steps[1])
    decayed = [Adam(weight_decay=0.1, decoupled=d) for d in (False, True)]
    steps = [o.step(start, update, o.init(start), lr=0.1)[0]["w"] for o in decayed]
    assert not torch.equal(steps[0], steps[1])
    # AdamW's first step: theta (1 - lr wd) - lr * sign-like m / (|m| + eps) with m/(1-beta1) = g exactly
    expected = 1 * (1 - 0.1 * 0.1) - 0.1 * 0.5 / (0.5 + 1e-8)
    torch.testing.assert_close(steps[1], torch.full((4, 3), expected, dtype=torch.float64), rtol=1e-14, atol=0)


def test_step_does_not_mutate_its_inputs():
    start = {"w": torch.randn(3, 3, dtype=torch.float64)}
    update = {"w": torch.randn(3, 3, dtype=torch.float64)}
    optimizer = Adam(weight_decay=0.1, decoupled=True, amsgrad=True)
    state = optimizer.init(start)
    copies = [t.clone() for t in (start["w"], update["w"], state.exp_avg["w"], state.exp_avg_sq["w"])]
    optimizer.step(start, update, state, lr=0.1)
    for before, after in zip(copies, (start["w"], update["w"], state.exp_avg["w"], state.exp_avg_sq["w"])):
        assert torch.equal(before, after)


def test_identity_with_w_workers_equals_single_process_big_batch_adamw():
    """The whole runner: identity aggregation of 4 workers' gradients then AdamW == torch.optim.AdamW on the
    concatenated batch, with a warm-up and a decay of the learning rate."""
    e = sim.Experiment(task="digits-mlp", workers=4, steps=30, batch_size=8, lr=0.003, optimizer="adamw",
                       optimizer_options={"betas": [0.85, 0.995], "eps": 1e-7}, weight_decay=0.02,
                       lr_warmup_steps=5, lr_milestones=(20,), lr_decay=0.5, task_options={"hidden": (32,)},
                       eval_every=0, dtype="float64", compressor={"name": "identity"})
    result = sim.run(e)

    simulation = Simulation(e)
    model = simulation.task.model().to(torch.float64)
    model.load_state_dict(simulation.initial_state().params)
    opt = torch.optim.AdamW(model.parameters(), lr=e.lr, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.02,
                            foreach=False)
    for step in range(e.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, e.lr, e.lr_warmup_steps, e.lr_milestones, e.lr_decay)
        indices = simulation.sampler.batch(range(e.workers), step).reshape(-1)  # the concatenated 4 x 8 batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(simulation.task.train_x[indices]),
                                          simulation.task.train_y[indices]).backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result.params[name], p.detach(), rtol=1e-9, atol=1e-11)
    assert result.extras["final_state"].optimizer.step == 30
    # Real processes share this runner: tests/test_cli_list.py runs AdamW through sim.launch against sim.run.


TINY = {"dim_in": 12, "dim_out": 10, "samples": 64, "test_samples": 8}


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_resume_from_a_checkpoint_is_bitwise(tmp_path, optimizer):
    e = sim.Experiment(task="synthetic-lowrank", task_options=TINY, workers=3, steps=12, batch_size=4,
                       eval_every=4, lr=0.01, weight_decay=0.01, optimizer=optimizer,
                       optimizer_options={"amsgrad": True}, compressor={"name": "powersgd", "rank": 2}, seed=2)
    full = sim.run(e)

    run_interrupted(e, tmp_path, stop_at=9, every=4)
    resumed = assert_resume_is_bitwise(e, full, tmp_path)
    assert isinstance(resumed.extras["final_state"].optimizer, AdamState)
    with pytest.raises(ValueError, match="optimizer"):  # another optimizer's checkpoint is refused
        sim.run(e.replace(optimizer="sgd", optimizer_options={}), resume_from=tmp_path)


def test_configs_and_overrides_reach_the_optimizer(tmp_path):
    path = tmp_path / "adam.toml"
    path.write_text('task = "synthetic-lowrank"\noptimizer = "adam"\nsteps = 3\n'
                    '[optimizer_options]\nbetas = [0.5, 0.9]\n[task_options]\nsamples = 64\n')
    config = load_config(path, {"optimizer_options.eps": 1e-5})
    assert config.experiment.optimizer == "adam"
    assert config.experiment.optimizer_options == {"betas": [0.5, 0.9], "eps": 1e-5}
    optimizer = config.experiment.make_optimizer()
    assert optimizer.betas == (0.5, 0.9) and optimizer.eps == 1e-5 and not optimizer.decoupled
    assert sim.Experiment.from_dict(config.experiment.to_dict()) == config.experiment
    swept = config.experiment.with_overrides({"optimizer_options.betas": [0.0, 0.5]})
    assert swept.make_optimizer().betas == (0.0, 0.5) and swept.optimizer_options["eps"] == 1e-5


@pytest.mark.parametrize("changes, named", [
    ({"optimizer": "lamb"}, "optimizer='lamb'"),
    ({"optimizer": "adam", "optimizer_options": {"beta": (0.9, 0.99)}}, "'betas'"),
    ({"optimizer": "adamw", "optimizer_options": {"betas": (0.9, 1.0)}}, "betas"),
    ({"optimizer": "adamw", "optimizer_options": {"betas": (-0.1, 0.9)}}, "betas"),
    ({"optimizer": "adamw", "optimizer_options": {"betas": 0.9}}, "betas"),
    ({"optimizer": "adam", "optimizer_options": {"eps": -1.0}}, "eps"),
    ({"optimizer": "adam", "optimizer_options": {"amsgrad": 1}}, "amsgrad"),
    ({"optimizer": "adam", "optimizer_options": [("eps", 1e-8)]}, "optimizer_options"),
    ({"optimizer": "adam", "momentum": 0.5}, "momentum"),
    ({"optimizer": "adamw", "momentum": 0.0}, "momentum"),
    ({"optimizer": "adam", "nesterov": True}, "nesterov"),
    ({"optimizer": "sgd", "optimizer_options": {"momentum": 0.9}}, "Experiment fields"),
    ({"optimizer": "sgd", "optimizer_options": {"eps": 1e-8}}, "allowed options: none"),
])
def test_bad_optimizer_settings_are_refused_naming_the_field(changes, named):
    with pytest.raises(ValueError, match="optimizer|momentum|nesterov") as error:
        sim.Experiment(**changes)
    assert named in str(error.value)


def test_unknown_option_error_lists_the_allowed_ones():
    with pytest.raises(ValueError) as error:
        sim.Experiment(optimizer="adamw", optimizer_options={"lr": 0.1})
    assert "allowed options: amsgrad, betas, eps" in str(error.value)



@pytest.mark.parametrize("mutate, named", [
    (lambda opt: opt["fields"].__setitem__("step", 99), "optimizer.step=99"),  # more updates than steps run
    (lambda opt: opt["fields"].__setitem__("step", -1), "optimizer.step=-1"),
    (lambda opt: next(iter(opt["fields"]["exp_avg_sq"].values())).fill_(float("nan")), "exp_avg_sq"),
])
def test_a_tampered_adam_checkpoint_is_refused_before_resuming(tmp_path, mutate, named):
    from compressors.serialization import digest
    from sim import checkpoint
    from sim.checkpoint_schema import body_of

    e = sim.Experiment(task="synthetic-lowrank", task_options=TINY, workers=2, steps=4, batch_size=4, eval_every=0,
                       optimizer="adam", lr=0.01)
    sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=2)
    path = checkpoint.latest(tmp_path)
    payload = torch.load(path, weights_only=True)
    mutate(payload["state"]["fields"]["optimizer"])
    payload["checksum"] = digest(body_of(payload))  # a consistent file: only the content check can catch it
    torch.save(payload, path)
    with pytest.raises(ValueError, match=named):
        sim.run(e, resume_from=path)
