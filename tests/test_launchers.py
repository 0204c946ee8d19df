"""Grid fan-out with submitit (moesae.training.launchers): ``train.launcher: submitit``.

A family trained through submitit jobs (in-process debug executor, or local processes) ends
bit-identical to the local launcher: same folders, weights, configs, logged rows and
fingerprints. The launcher keys are not part of the fingerprint; a job that fails is reported
with its log; a preempted job checkpoints, is requeued and resumes bit for bit; finished
variants are never retrained.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import yaml

from moesae.params import ParamsError
from moesae.training.launchers import SubmititConfig, TrainJob, chunks, pop_launch_settings, run_jobs
from moesae.training.trainer import read_train_log

REPO = Path(__file__).resolve().parents[1]
FAMILY = {"topk": {"architecture": "topk", "l0": [2, 4]}}
TIMING_KEYS = {"train_seconds", "tokens_per_second", "wall_seconds"}


def _workdir(root: Path, submitit: dict | None = None) -> Path:
    from test_distributed import stage_workdir

    train = {"launcher": "submitit", "submitit": submitit} if submitit is not None else None
    return stage_workdir(root, FAMILY, train)


def _train(work: Path, names=None, **kwargs) -> list[str]:
    from moesae.grid import family_variants
    from moesae.params import load_params
    from moesae.training.stage import train_variants

    with contextlib.chdir(work):
        names = names or family_variants(load_params("params.yaml"), "topk")
        return train_variants(names, "params.yaml", progress=False, **kwargs)


def _outputs(work: Path) -> dict[str, dict]:
    """Every variant's files, with the log's timing numbers left out."""
    out = {}
    for folder in sorted((work / "models" / "topk").iterdir()):
        rows, summary = read_train_log(folder)
        out[folder.name] = {
            "weights": (folder / "sae_weights.safetensors").read_bytes(),
            "cfg": (folder / "cfg.json").read_text(),
            "rows": rows,
            "summary": {k: v for k, v in summary.items() if k not in TIMING_KEYS},
            "files": sorted(p.name for p in folder.iterdir()),
        }
    return out


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> dict[str, dict]:
    work = _workdir(tmp_path_factory.mktemp("local") / "work")
    assert _train(work) == ["topk_k2", "topk_k4"]
    return _outputs(work)


def test_launcher_settings_are_validated_naming_the_key():
    assert pop_launch_settings({}).launcher == "local"
    section = {"steps": 3, "launcher": "submitit", "submitit": {"executor": "debug", "variants_per_job": 2}}
    settings = pop_launch_settings(section)
    assert section == {"steps": 3}  # removed: neither TrainConfig nor the fingerprint sees them
    assert settings.launcher == "submitit" and settings.submitit.variants_per_job == 2
    with pytest.raises(ParamsError, match="train.launcher"):
        pop_launch_settings({"launcher": "slurm"})
    with pytest.raises(ParamsError, match="train.submitit.variants_per_jobs"):
        pop_launch_settings({"submitit": {"variants_per_jobs": 2}})
    with pytest.raises(ParamsError, match="train.submitit.executor"):
        pop_launch_settings({"submitit": {"executor": "cloud"}})
    assert chunks(["a", "b", "c"], 2) == [["a", "b"], ["c"]]


def test_submitit_debug_executor_trains_a_family_bit_identical_to_local(tmp_path, local_reference, capsys):
    work = _workdir(tmp_path / "work", {"executor": "debug", "variants_per_job": 1, "folder": "logs/jobs"})
    assert sorted(_train(work)) == ["topk_k2", "topk_k4"]
    assert "2 variant(s) in 2 submitit job(s), executor debug" in capsys.readouterr().out
    assert _outputs(work) == local_reference  # weights, configs, logs, fingerprints
    # the launcher keys are not in the fingerprint: the local launcher finds everything up to date
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["launcher"] = "local"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    assert _train(work) == []


def test_several_variants_per_job_share_one_pass(tmp_path, local_reference, capsys):
    work = _workdir(tmp_path / "work", {"executor": "debug", "variants_per_job": 2, "folder": "logs/jobs"})
    assert sorted(_train(work)) == ["topk_k2", "topk_k4"]
    assert "2 variant(s) in 1 submitit job(s)" in capsys.readouterr().out
    assert _outputs(work) == local_reference


def test_a_failed_job_is_reported_with_its_log_and_finished_variants_stay(tmp_path, local_reference, capsys):
    work = _workdir(tmp_path / "work", {"executor": "debug", "folder": "logs/jobs"})
    assert _train(work, ["topk_k2"], launcher="local") == ["topk_k2"]
    done = work / "models" / "topk" / "topk_k2" / "sae_weights.safetensors"
    stamp = done.stat().st_mtime_ns
    for shard in (work / "data" / "activations" / "train").glob("shard_*.npy"):
        shard.unlink()  # the job for topk_k4 cannot read the cache
    with pytest.raises(RuntimeError, match=r"topk_k4\) failed: .*activation shard .* is missing"):
        _train(work)
    assert "topk_k2: up to date, skipped" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == stamp  # a finished variant is never retrained


@pytest.mark.slow
def test_local_executor_preempted_job_checkpoints_requeues_and_matches_local(tmp_path, local_reference, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    work = _workdir(tmp_path / "work", {"executor": "local", "poll_seconds": 0.5, "timeout_min": 10,
                                        "folder": "logs/jobs"})
    # topk_k2: a job that is preempted (SIGUSR2) at step 5 of 12, checkpoints and is requeued
    cfg = SubmititConfig(executor="local", poll_seconds=0.5, timeout_min=10)
    outcomes = run_jobs([["topk_k2"]], lambda names: TrainJob(names, str(work / "params.yaml"), str(work),
                                                               preempt_at_step=5), cfg, work / "logs" / "drill")
    (outcome,) = outcomes
    assert outcome.error is None and outcome.trained == ["topk_k2"], outcome
    log = Path(outcome.log).with_suffix(".out").read_text()
    assert "caught SIGUSR2" in log and "checkpointed, requeued" in log and "resuming from the checkpoints" in log
    # topk_k4 through the stage itself, as a local job; topk_k2 is up to date and not resubmitted
    assert _train(work) == ["topk_k4"]
    assert _outputs(work) == local_reference
    # a job that fails is reported with its log, which holds the traceback
    for shard in (work / "data" / "activations" / "train").glob("shard_*.npy"):
        shard.unlink()
    with pytest.raises(RuntimeError, match=r"topk_k4\) failed: .*; log: (\S+\.err)") as failure:
        _train(work, ["topk_k4"], force=True)
    log = Path(failure.value.args[0].rsplit("log: ", 1)[1].strip())
    assert "activation shard" in log.read_text()
    assert json.loads((work / "models" / "topk" / "topk_k2" / "cfg.json").read_text())


def test_slurm_settings_become_sbatch_parameters(tmp_path, monkeypatch):
    """No cluster here: a stand-in ``srun`` lets submitit build the sbatch script it would submit."""
    from moesae.training.launchers import make_executor

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    settings = pop_launch_settings({"launcher": "submitit", "submitit": {
        "executor": "slurm", "partition": "gpu", "gpus_per_node": 2, "cpus_per_task": 8, "mem_gb": 64,
        "timeout_min": 90, "max_parallel": 3, "slurm": {"account": "proj", "qos": "high"}}}).submitit
    executor = make_executor(settings, "slurm", tmp_path / "jobs", "moesae-train-topk")
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=64GB", "--time=90",
                 "--account=proj", "--qos=high", "--job-name=moesae-train-topk", "--signal=USR2@90"):
        assert f"#SBATCH {line}" in script, line
    assert executor._executor.parameters["array_parallelism"] == 3
