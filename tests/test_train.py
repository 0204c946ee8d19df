"""The trainer: schedule, determinism, resume after interruption, divergence errors."""
from __future__ import annotations

import math

import pytest
import torch

from moesae import build_sae
from moesae.training import (
    TrainConfig,
    TrainingDiverged,
    TrainingRun,
    finish,
    lr_multiplier,
    read_train_log,
    tensor_batches,
    train_saes,
)


def _data(n=2048, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 1


def _runs(tmp_path=None, steps=30):
    cfg = TrainConfig(steps=steps, log_every=5, checkpoint_every=10)
    specs = {
        "topk": ("topk", {}),
        "scale": ("scale", {"num_experts": 4, "active_experts": 2}),
        "switch": ("switch", {"num_experts": 4}),
    }
    return [
        TrainingRun(
            name=name,
            sae=build_sae(arch, d_in=12, num_latents=64, k=4, **extra),
            config=cfg,
            out_dir=None if tmp_path is None else tmp_path / name,
        )
        for name, (arch, extra) in specs.items()
    ]


def test_lr_schedule_constant_then_linear_decay():
    assert lr_multiplier(0, 100, 0.2) == 1.0
    assert lr_multiplier(79, 100, 0.2) == 1.0
    assert lr_multiplier(80, 100, 0.2) == 1.0
    assert math.isclose(lr_multiplier(90, 100, 0.2), 0.5)
    assert math.isclose(lr_multiplier(99, 100, 0.2), 0.05)
    assert lr_multiplier(50, 100, 0.0) == 1.0


def test_default_lr_follows_width_rule():
    run = _runs()[0]
    assert math.isclose(run.base_lr, 2e-4 / math.sqrt(64 / 2**14))


def test_training_is_deterministic_and_feeds_every_sae_the_same_batches():
    data = _data()
    a = train_saes(_runs(), tensor_batches(data, 128, seed=3), progress=False)
    b = train_saes(_runs(), tensor_batches(data, 128, seed=3), progress=False)
    for ra, rb in zip(a, b):
        for (name, pa), pb in zip(ra.sae.state_dict().items(), rb.sae.state_dict().values()):
            assert torch.equal(pa, pb), (ra.name, name)
    # each run logged the same step numbers and trained on the same number of tokens
    assert {r.tokens_seen for r in a} == {30 * 128}


def test_loss_decreases():
    data = _data()
    runs = train_saes(_runs(steps=60), tensor_batches(data, 128), progress=False)
    for r in runs:
        assert r.history[-1]["mse"] < r.history[0]["mse"], r.name


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    data = _data()
    reference = train_saes(_runs(), tensor_batches(data, 128, seed=1), progress=False)
    interrupted = _runs(tmp_path)
    train_saes(interrupted, tensor_batches(data, 128, seed=1), progress=False, stop_after=13)
    assert all((tmp_path / r.name / "checkpoint.pt").exists() for r in interrupted)
    resumed = train_saes(_runs(tmp_path), tensor_batches(data, 128, seed=1), progress=False)
    for ref, res in zip(reference, resumed):
        assert res.tokens_seen == ref.tokens_seen
        for key, value in ref.sae.state_dict().items():
            assert torch.equal(value, res.sae.state_dict()[key]), (ref.name, key)
        finish(res)
        rows, summary = read_train_log(tmp_path / res.name)
        assert summary["tokens_seen"] == 30 * 128 and rows[-1]["step"] == 29
        assert not (tmp_path / res.name / "checkpoint.pt").exists()


def test_checkpoint_for_another_config_is_refused(tmp_path):
    data = _data()
    runs = _runs(tmp_path)
    train_saes(runs, tensor_batches(data, 128), progress=False, stop_after=2)
    other = TrainingRun(
        name="topk", sae=build_sae("topk", d_in=12, num_latents=64, k=8), config=runs[0].config, out_dir=tmp_path / "topk"
    )
    with pytest.raises(RuntimeError, match="different configuration"):
        train_saes([other], tensor_batches(data, 128), progress=False)


def test_nan_in_data_raises_clear_error_naming_the_sae():
    data = _data()
    data[5] = float("nan")
    run = _runs()[0]
    with pytest.raises(TrainingDiverged, match=r"\[topk\].*step"):
        train_saes([run], tensor_batches(data, 2048), progress=False)


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="'steps'"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="'decay_fraction'"):
        TrainConfig(decay_fraction=1.5)


def test_decoder_rows_stay_unit_norm():
    data = _data()
    run = train_saes(_runs(steps=20)[:1], tensor_batches(data, 128), progress=False)[0]
    # renormalised before each step and gradients projected: after the last Adam step the
    # rows have drifted only by second-order terms
    norms = run.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="thread-order nondeterminism needs at least 2 threads")
@pytest.mark.parametrize("architecture,extra", [("scale", {"num_experts": 16, "active_experts": 2}), ("topk", {})])
def test_multithreaded_training_is_bit_for_bit_reproducible(architecture, extra):
    # Large enough that the gradient scatter into repeated rows runs on several threads (with
    # advanced-indexing backward, two identical runs differed in the last bits at this size).
    data = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)) * 2 + 1

    def train() -> dict[str, torch.Tensor]:
        sae = build_sae(architecture, d_in=64, num_latents=2048, k=32, seed=0, **extra)
        run = TrainingRun("r", sae, TrainConfig(steps=8, log_every=4, checkpoint_every=0))
        train_saes([run], tensor_batches(data, 1024, seed=0), progress=False)
        return sae.state_dict()

    first, second = train(), train()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_nan_is_reported_at_the_step_it_appears():
    data = _data()
    poisoned = data[:128].clone()
    poisoned[3] = float("nan")
    clean = tensor_batches(data, 128, seed=0)

    def batch_at(step):
        return poisoned if step == 7 else clean(step)

    before = _runs()[0]
    with pytest.raises(TrainingDiverged, match=r"\[topk\] the (loss|gradient norm) became nan at step 7\b"):
        train_saes([before], batch_at, progress=False)
    # the optimiser step of the bad batch never ran: the weights are still finite
    assert all(torch.isfinite(p).all() for p in before.sae.parameters())


def test_nan_in_a_worker_is_raised_in_the_parent_naming_the_sae_and_step():
    data = _data()
    poisoned = data[:128].clone()
    poisoned[0] = float("nan")
    clean = tensor_batches(data, 128, seed=0)
    with pytest.raises(TrainingDiverged, match=r"\[(topk|scale|switch)\] .* at step 4\b"):
        train_saes(_runs(), lambda step: poisoned if step == 4 else clean(step), progress=False, workers=2, threads=1)


def test_workers_do_not_change_results_and_resume_bit_for_bit(tmp_path):
    """Runs split among 2 processes (1 thread each) end bit for bit where 1 process with 1 thread
    ends, with the same logs; and an interrupted worker run resumes to the same weights."""
    data = _data()
    one = train_saes(_runs(), tensor_batches(data, 128, seed=2), progress=False, workers=1, threads=1)
    two = train_saes(_runs(), tensor_batches(data, 128, seed=2), progress=False, workers=2, threads=1)
    for a, b in zip(one, two):
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), (a.name, key)
        assert a.history == b.history and a.tokens_seen == b.tokens_seen == 30 * 128
        assert b.seconds > 0
        # the optimiser state came back too (a caller could keep training)
        assert b.optimizer.state_dict()["state"][0]["step"] == a.optimizer.state_dict()["state"][0]["step"]
    interrupted = _runs(tmp_path)
    train_saes(interrupted, tensor_batches(data, 128, seed=2), progress=False, stop_after=11, workers=2, threads=1)
    assert all((tmp_path / r.name / "checkpoint.pt").exists() for r in interrupted)
    resumed = train_saes(_runs(tmp_path), tensor_batches(data, 128, seed=2), progress=False, workers=2, threads=1)
    for a, b in zip(one, resumed):
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), (a.name, key)


def test_partition_balances_and_keeps_order():
    from moesae.training.trainer import partition_runs, step_cost

    runs = _runs()
    groups = partition_runs(runs, 2)
    assert sorted(r.name for g in groups for r in g) == sorted(r.name for r in runs)
    assert len(groups) == 2 and all(g for g in groups)
    assert partition_runs(runs, 2) == groups  # deterministic
    assert partition_runs(runs, 1) == [runs] and len(partition_runs(runs, 8)) == len(runs)
    assert all(step_cost(r) > 0 for r in runs)
    with pytest.raises(ValueError, match="'workers'"):
        train_saes(runs, tensor_batches(_data(), 128), progress=False, workers=0)
    with pytest.raises(ValueError, match="'threads'"):
        train_saes(runs, tensor_batches(_data(), 128), progress=False, threads=0)


# ---- the dead-latent window (AuxK at every scale) --------------------------------------------
def test_dead_latent_window_is_a_fraction_of_each_runs_training_tokens():
    from moesae.params import ParamsError
    from moesae.training.stage import resolve_dead_tokens_threshold, stage_settings

    settings = stage_settings({"batch_size": 1024, "data_seed": 0})
    assert settings["dead_tokens_fraction"] == 0.122 and settings["dead_tokens_threshold"] is None
    assert settings["threads"] == 1 and settings["workers"] == 2
    # the paper's ratio (10M of 82M tokens) of steps × batch, per run
    assert resolve_dead_tokens_threshold(settings, 1200) == round(1200 * 1024 * 0.122) == 149914
    assert resolve_dead_tokens_threshold(settings, 300) == round(300 * 1024 * 0.122)
    explicit = stage_settings({"batch_size": 1024, "data_seed": 0, "dead_tokens_threshold": 500_000})
    assert resolve_dead_tokens_threshold(explicit, 1200) == 500_000  # a token count still overrides
    bad = [("dead_tokens_fraction", 0), ("dead_tokens_fraction", 1.5), ("dead_tokens_fraction", "0.1"),
           ("dead_tokens_threshold", 0), ("dead_tokens_threshold", 2.5), ("threads", 0), ("workers", 0),
           ("workers", None), ("batch_size", 0)]
    for key, value in bad:
        with pytest.raises(ParamsError, match=rf"'train\.{key}'"):
            stage_settings({"batch_size": 1024, "data_seed": 0, key: value})
    with pytest.raises(ParamsError, match=r"'train\.data_seed' is missing"):
        stage_settings({"batch_size": 1024})


def test_workers_are_not_part_of_the_fingerprint_but_threads_are():
    from moesae.training.fingerprint import training_fingerprint
    from moesae.training.stage import fingerprint_recipe

    variant = {"family": "topk", "architecture": "topk", "num_latents": 64, "k": 4, "seed": 0}
    base = {"steps": 10, "batch_size": 8, "data_seed": 0, "threads": 1, "workers": 2}
    fp = lambda section: training_fingerprint(variant, fingerprint_recipe(section))  # noqa: E731
    assert fp(base) == fp({**base, "workers": 1})
    assert fp(base) != fp({**base, "threads": 2})
    assert fp(base) != fp({**base, "dead_tokens_fraction": 0.2})


def test_auxk_turns_on_at_the_default_size_once_latents_go_dead():
    """Default-profile size (d = 64, M = 2048, batch 1024): with the window a fraction of the
    training tokens, latents that stop firing count as dead within the run and AuxK trains them;
    with the old fixed 500,000 tokens (more than the run sees) AuxK never runs."""
    from moesae.training.stage import resolve_dead_tokens_threshold, stage_settings

    steps, batch = 40, 1024
    window = resolve_dead_tokens_threshold(stage_settings({"batch_size": batch, "data_seed": 0}), steps)
    assert window == round(steps * batch * 0.122) < steps * batch
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 4, generator=g)).Q.T  # activations in a 4-dim subspace:
    data = torch.randn(8 * batch, 4, generator=g) @ basis * 3 + 0.5  # most latents never win the TopK

    def train(threshold):
        sae = build_sae("topk", d_in=64, num_latents=2048, k=8, dead_tokens_threshold=threshold)
        run = TrainingRun("topk", sae, TrainConfig(steps=steps, log_every=2, checkpoint_every=0))
        train_saes([run], tensor_batches(data, batch), progress=False, threads=1)
        return run.history

    history = train(window)
    first_dead_step = math.ceil(window / batch)  # a latent silent since step 0 is dead from here on
    assert all(h["auxk"] == 0 and h["dead_fraction"] == 0 for h in history if h["step"] < first_dead_step - 1)
    later = [h for h in history if h["step"] >= first_dead_step]
    assert later and all(h["auxk"] > 0 and h["dead_fraction"] > 0.1 for h in later)
    assert all(h["auxk"] == 0 and h["dead_fraction"] == 0 for h in train(500_000))


def test_requested_stop_reaches_every_worker_and_resumes_bit_for_bit(tmp_path):
    from moesae.training.trainer import TrainingInterrupted

    data = _data()
    reference = train_saes(_runs(), tensor_batches(data, 128, seed=4), progress=False, workers=1, threads=1)
    stopped = _runs(tmp_path)
    with pytest.raises(TrainingInterrupted):
        train_saes(stopped, tensor_batches(data, 128, seed=4), progress=False, workers=2, threads=1,
                   stop_after=lambda steps: steps >= 9)
    # the first worker to see the request stops at step 9; it then stops the other at its next step
    steps = [torch.load(tmp_path / r.name / "checkpoint.pt", weights_only=False)["step"] for r in stopped]
    assert max(steps) == 9 and min(steps) >= 1
    resumed = train_saes(_runs(tmp_path), tensor_batches(data, 128, seed=4), progress=False, workers=2, threads=1)
    for ref, res in zip(reference, resumed):
        for key, value in ref.sae.state_dict().items():
            assert torch.equal(value, res.sae.state_dict()[key]), (ref.name, key)
