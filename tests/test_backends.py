"""Every backend gives the 1-process results, and silent launch misconfigurations fail loudly.

Slow tests: `train`, `score` and `unlearn` of the smoke preset with 2 CPU processes under DDP (gloo), DeepSpeed
ZeRO-2 and ZeRO-3, each compared with one process. Each stage starts from the 1-process run's inputs (the same
prepared data, the same trained models, the same scores), so a difference belongs to that stage alone instead
of compounding through the pipeline.

Cheap tests: the accelerate configs load, the launchers build the right commands, and the guards of
the design stops `--cpu --num_processes 2` and multi-process launches without CUDA or ACCELERATE_USE_CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import PY, ROOT, assert_same_curve, free_port, launch, smoke_config

CONFIGS = ROOT / "accelerate_configs"
BACKENDS = {  # name: (accelerate config, distributed type and ZeRO stage printed by the [setup] line)
    "ddp": ("cpu_ddp.yaml", "type=MULTI_CPU backend=gloo zero_stage=0"),
    "zero2": ("cpu_deepspeed_zero2.yaml", "type=DEEPSPEED backend=gloo zero_stage=2"),
    "zero3": ("cpu_deepspeed_zero3.yaml", "type=DEEPSPEED backend=gloo zero_stage=3"),
}
# Short enough for CI; train.parallel=data and unlearn.parallel=data so that DDP trains both models and runs the
# requests data-parallel (the all-reduce paths under test) rather than job-parallel, which never
# communicate (the default `auto` picks those with 2 models or 2+ requests on 2 processes).
OVERRIDES = ["train.steps=30", "unlearn.max_steps=4", "unlearn.request_kinds=[canary]", "train.parallel=data",
             "unlearn.parallel=data"]
MODELS = ("original", "oracle")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _env(**extra) -> dict:
    """Environment of a launched run; DeepSpeed keeps the CPU ops it compiles in the checkout."""
    return {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")), **extra}


def _launch_stage(backend: str, stage: str, run_dir: Path, *extra: str) -> str:
    config, setup = BACKENDS[backend]
    res = launch(stage, "--preset", "smoke", "--debug", f"run.dir={run_dir}", *extra, *OVERRIDES, config=config,
                 env=_env(), timeout=900)
    if res.returncode != 0:
        # rank 0's traceback (--debug): the project's frames and the error, not the launcher's own traceback
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("[rank0]:")
                 and not set(ln.split(":", 1)[1].strip()) <= set("^~ ")]
        shown = [ln for ln in lines if "/unlearnbench/" in ln] + lines[-2:]
        if not shown:
            shown = [ln for ln in res.stderr.splitlines() if "Error" in ln or "error:" in ln][:20]
        pytest.fail(f"{backend} {stage} failed (exit {res.returncode}):\n" + "\n".join(shown), pytrace=False)
    # the backend really is the one asked for (ACCELERATE_USE_CPU in the environment silently drops DeepSpeed)
    assert f"processes=2 {setup}" in res.stdout, res.stdout[:2000]
    return res.stdout


def _weights(run_dir: Path, name: str) -> dict:
    return load_file(str(run_dir / "models" / name / "model.safetensors"))


def _scores(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "scores" / f"{name}.parquet").sort_values("example_id").reset_index(drop=True)


def _curve(run_dir: Path, request: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "unlearn" / request / "curve.parquet")


def _requests(run_dir: Path) -> list[str]:
    names = sorted(p.name for p in (run_dir / "unlearn").iterdir() if (p / "curve.parquet").exists())
    assert names, f"no unlearning request finished in {run_dir}"
    return names


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory):
    """The reference: train, score and unlearn in one process, from the shared prepared smoke data."""
    from unlearnbench.study import run_study

    run = tmp_path_factory.mktemp("backends") / "one"
    shutil.copytree(prepared[1], run)
    cfg = smoke_config(run, *OVERRIDES)
    for stage in ("train", "score", "unlearn"):
        run_study(cfg, stage)
    return run


# ---------------------------------------------------------------------------------------------------------------
# train, score and unlearn under each backend


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_train_matches_one_process(backend, one_process, prepared, tmp_path):
    run = tmp_path / backend
    shutil.copytree(prepared[1], run)
    out = _launch_stage(backend, "train", run)
    assert "effective batch 16 = 8 x 1 accumulation x 2 processes" in out
    for name in MODELS:
        a, b = _weights(one_process, name), _weights(run, name)
        # A DeepSpeed save clones the state dict, which hides the embedding/lm_head tie from save_pretrained:
        # the tied copy is then written as well. It must be an exact copy of the embedding.
        extra = set(b) - set(a)
        assert set(a) <= set(b) and extra <= {"lm_head.weight"}, (set(a) ^ set(b))
        for key in extra:
            assert (b[key] == b["model.embed_tokens.weight"]).all()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"[{backend}] train {name}: max |w_1 - w_2| = {diff:.2e}")
        # Same batches, same global-mean loss and the same clipping; only the order of float32 sums differs
        # (all-reduce / reduce-scatter vs one process), which 30 Adam steps amplify to ~1e-5 (measured: DDP 1e-6,
        # ZeRO-2 and ZeRO-3 8e-6). One step moves a weight by up to lr = 3e-3, and a real fault (a missing
        # all-reduce, a wrong accumulation or clipping) moves weights by 1e-3 to 1e-1: 1e-4 separates the two.
        assert diff < 1e-4
    rec_one = json.loads((one_process / "stages" / "train.json").read_text())["info"]["models"]
    rec_two = json.loads((run / "stages" / "train.json").read_text())["info"]["models"]
    for name in MODELS:
        assert rec_two[name]["steps"] == rec_one[name]["steps"] == 30
        # the recorded parameter count is the model's, not the size of this rank's ZeRO-3 shard
        assert rec_two[name]["params"] == rec_one[name]["params"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_score_matches_one_process(backend, one_process, tmp_path):
    run = tmp_path / backend
    shutil.copytree(one_process, run)
    _launch_stage(backend, "score", run, "--force")
    for name in MODELS:
        a, b = _scores(one_process, name), _scores(run, name)
        assert list(a.example_id) == list(b.example_id)  # every example exactly once
        assert (a.n_tokens.to_numpy() == b.n_tokens.to_numpy()).all()
        diff = float(np.abs(a.nll - b.nll).max())
        print(f"[{backend}] score {name}: max |nll_1 - nll_2| = {diff:.2e} nats/token")
        # The same weights and the same length-bucketed batches: an example's NLL is its own forward pass, so
        # processes only change which rank computes it (measured: 0 under ZeRO-3). 1e-5 nats/token allows
        # a different batch shape's matmul blocking; a misassigned or duplicated example is off by >1e-2.
        assert diff < 1e-5
    ua = json.loads((one_process / "scores" / "utility.json").read_text())
    ub = json.loads((run / "scores" / "utility.json").read_text())
    np.testing.assert_allclose(ua["original"]["id_holdout_ppl"], ub["original"]["id_holdout_ppl"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unlearn_matches_one_process(backend, one_process, tmp_path):
    run = tmp_path / backend
    shutil.copytree(one_process, run)
    out = _launch_stage(backend, "unlearn", run, "--force")
    assert "data-parallel" in out
    assert _requests(run) == _requests(one_process)
    for request in _requests(one_process):
        a, b = _curve(one_process, request), _curve(run, request)
        d_uq = float(np.abs(a.uq - b.uq).max())
        d_exp = float(np.abs(a.exposure_mean - b.exposure_mean).max())
        d_ppl = float((np.abs(a.id_holdout_ppl - b.id_holdout_ppl) / a.id_holdout_ppl).max())
        print(f"[{backend}] unlearn {request}: max |Δuq| {d_uq:.2e}, |Δexposure| {d_exp:.2e} bits, "
              f"ppl rel {d_ppl:.2e}")
        assert_same_curve(a, b)  # tolerances and why: conftest


# ---------------------------------------------------------------------------------------------------------------
# guards against silent misconfiguration (docs/definitions.md, distributed execution)


def _plain_env(**extra) -> dict:
    """This environment without any accelerate launch variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                      "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra}


def _no_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the guards against multi-process CPU launches apply only without CUDA")


def test_world_size_without_use_cpu_exits_2(tmp_path):
    """What `--multi_gpu` without CUDA hands each process: WORLD_SIZE=2 but no CPU process group."""
    _no_cuda()
    run = tmp_path / "run"
    res = subprocess.run([PY, "-m", "unlearnbench", "prepare", "--preset", "smoke", f"run.dir={run}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=_plain_env(WORLD_SIZE="2"))
    assert res.returncode == 2, res.stderr
    assert "ACCELERATE_USE_CPU=1" in res.stderr and "independent" in res.stderr
    assert not run.exists()  # refused before anything was written


def test_cpu_flag_with_two_processes_fails(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process; the run must refuse, not run alone."""
    run = tmp_path / "run"
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "unlearnbench", "prepare", "--preset", "smoke", f"run.dir={run}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_plain_env())
    assert res.returncode != 0
    assert "asked for 2 processes but started 1" in res.stderr
    assert "ACCELERATE_USE_CPU=1" in res.stderr  # the message carries the fix
    assert not run.exists()


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_USE_CPU": "1", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     ["asks for DeepSpeed", "drops DeepSpeed", "env -u ACCELERATE_USE_CPU"]),
    ({"ACCELERATE_USE_CPU": "1", "ACCELERATE_USE_FSDP": "true"}, ["asks for FSDP", "drops FSDP", "cpu_deepspeed_zero3"]),
    ({"ACCELERATE_USE_FSDP": "true"}, ["asks for FSDP", "no CUDA device", "cpu_deepspeed_zero3"]),
], ids=["use_cpu_drops_deepspeed", "use_cpu_drops_fsdp", "fsdp_without_cuda"])
def test_backend_silently_dropped_is_refused(tmp_path, env, words):
    """What a DeepSpeed / FSDP config hands each process when the launch cannot honour it."""
    _no_cuda()
    run = tmp_path / "run"
    res = subprocess.run([PY, "-m", "unlearnbench", "prepare", "--preset", "smoke", f"run.dir={run}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=_plain_env(**env))
    assert res.returncode == 2, res.stderr
    assert all(w in res.stderr for w in words), res.stderr
    assert "Traceback" not in res.stderr and not run.exists()


@pytest.mark.slow
def test_multi_gpu_launch_without_cuda_or_use_cpu_fails(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine would start 2 independent runs."""
    _no_cuda()
    run = tmp_path / "run"
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "unlearnbench", "prepare", "--preset", "smoke", f"run.dir={run}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_plain_env())
    assert res.returncode != 0
    assert "ACCELERATE_USE_CPU=1" in res.stderr and "independent" in res.stderr
    assert not run.exists()


# ---------------------------------------------------------------------------------------------------------------
# configs and launchers


EXPECTED_CONFIGS = ["cpu_ddp.yaml", "cpu_deepspeed_zero2.yaml", "cpu_deepspeed_zero3.yaml", "single_gpu.yaml",
                    "multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                    "deepspeed_zero3_offload.yaml", "fsdp.yaml"]


@pytest.mark.parametrize("name", EXPECTED_CONFIGS)
def test_accelerate_config_loads_and_documents_itself(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    cfg = load_config_from_file(str(path))  # accelerate's own loader: rejects unknown keys
    text = path.read_text()
    header = text.split("\ncompute_environment")[0]
    assert text.startswith("#") and all(line.startswith("#") for line in header.splitlines())
    assert "Memory" in header and "Speed" in header  # when to use it, what it costs
    assert "--num_processes" in header or "num_processes" in header  # how to change the process count
    raw = yaml.safe_load(text)
    ds = raw.get("deepspeed_config") or {}
    if ds.get("zero_stage") == 3:
        # the train stage saves with accelerator.get_state_dict, which gathers ZeRO-3 shards only with this flag
        assert ds["zero3_save_16bit_model"] is True
    if name.startswith("cpu_"):
        assert cfg.mixed_precision == "no" and cfg.num_processes == 2
    else:
        assert cfg.mixed_precision == "bf16"


def test_gpu_configs_select_the_intended_backends():
    from accelerate.commands.config.config_args import load_config_from_file

    load = lambda n: load_config_from_file(str(CONFIGS / n))  # noqa: E731
    assert str(load("single_gpu.yaml").distributed_type).endswith("NO")
    assert str(load("multi_gpu.yaml").distributed_type).endswith("MULTI_GPU")
    offload = load("deepspeed_zero3_offload.yaml").deepspeed_config
    assert offload["zero_stage"] == 3
    assert offload["offload_optimizer_device"] == "cpu" and offload["offload_param_device"] == "cpu"
    for n in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        c = load(n).deepspeed_config
        assert c["offload_optimizer_device"] == c["offload_param_device"] == "none"
        assert c["deepspeed_multinode_launcher"] == "standard"  # one accelerate launch per node (SLURM)
    fsdp = load("fsdp.yaml")
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.fsdp_config["fsdp_version"] == 2


def _local_sh(*args, **env) -> subprocess.CompletedProcess:
    e = {**_plain_env(), "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=e)


def test_launch_scripts_parse():
    for script in ("local.sh", "slurm_multinode.sbatch"):
        res = subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert os.access(ROOT / "launch" / "local.sh", os.X_OK)


@pytest.mark.parametrize("gpus, config, flags", [
    ("0", "cpu_ddp.yaml", ["ACCELERATE_USE_CPU=1"]),
    ("1", "single_gpu.yaml", []),
    ("8", "multi_gpu.yaml", ["--num_processes 8"]),
])
def test_local_sh_picks_the_config_from_the_hardware(gpus, config, flags):
    res = _local_sh("run", "--preset", "smoke", "train.steps=50", NUM_GPUS=gpus)
    assert res.returncode == 0, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert f"accelerate_configs/{config} " in line
    assert all(f in line for f in flags)
    assert "--main_process_port " in line
    assert line.endswith("-m unlearnbench run --preset smoke train.steps=50")  # stage and overrides pass through
    if gpus != "0":
        assert "ACCELERATE_USE_CPU" not in line


def test_local_sh_config_override():
    res = _local_sh("train", CONFIG="cpu_deepspeed_zero3.yaml", NUM_GPUS="0")
    assert res.returncode == 0, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "accelerate_configs/cpu_deepspeed_zero3.yaml" in line
    assert "ACCELERATE_USE_CPU" not in line  # it would silently drop DeepSpeed
    res = _local_sh("train", CONFIG="no_such.yaml", NUM_GPUS="0")
    assert res.returncode == 2 and "no_such.yaml" in res.stderr


def test_slurm_script_starts_one_launch_per_node(tmp_path):
    """With stand-ins for srun, scontrol and accelerate: one launch per node, ranks from SLURM_NODEID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'echo node-a; echo node-b',
        "srun": 'while [[ "$1" == --* ]]; do shift; done; for n in 0 1; do SLURM_NODEID=$n "$@"; done',
        "accelerate": "printf '<%s>' \"$@\"; echo",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**_plain_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_NODELIST": "node-[a-b]"}
    res = subprocess.run(["bash", str(ROOT / "launch" / "slurm_multinode.sbatch"), "run", "--preset", "paper",
                          "unlearn.request_kinds=[id, canary]"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    launches = [line for line in res.stdout.splitlines() if line.startswith("<launch>")]
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        for part in ("<--num_machines><2>", "<--num_processes><8>", f"<--machine_rank><{rank}>",
                     "<--main_process_ip><node-a>", "<--main_process_port><", "<-m><unlearnbench><run>",
                     f"<run.dir={tmp_path}/runs/slurm-4242>", "<tracking.group=slurm-4242>",
                     "<--preset><paper><unlearn.request_kinds=[id, canary]>"):
            assert part in line, (part, line)
    assert (tmp_path / "runs" / "slurm-4242").is_dir()
