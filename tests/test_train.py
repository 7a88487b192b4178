"""Training: 2 processes match 1 process with the same effective batch; job-parallel training (each process trains
whole models) gives the 1-process weights bit for bit; an interrupted run resumes exactly, in either mode."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load_file

from conftest import PY, ROOT, free_port, launch, smoke_config

STEPS = ["train.steps=30", "train.checkpoint_every=10", "train.log_every=10"]
MODELS = ("original", "oracle")


def _weights(run_dir, name):
    return load_file(str(run_dir / "models" / name / "model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _same_bytes(a, b, name):
    return (a / "models" / name / "model.safetensors").read_bytes() == (b / "models" / name / "model.safetensors").read_bytes()


def _copy_prepared(prepared, dest):
    _, src = prepared
    shutil.copytree(src, dest)
    return dest


@pytest.fixture
def one_thread():
    """Train in this process with one thread, as each launched process does (OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """original and oracle trained with STEPS in this process, one thread (as each launched process has)."""
    import torch

    from unlearnbench.study import run_study

    run = _copy_prepared(prepared, tmp_path_factory.mktemp("train") / "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(smoke_config(run, *STEPS), "train")
    finally:
        torch.set_num_threads(threads)
    return run


# ---------------------------------------------------------------------------------------------------------------
# data-parallel (DDP) and what every run must give


def test_two_processes_match_one(reference, prepared, tmp_path):
    two = _copy_prepared(prepared, tmp_path / "two")
    res = launch("train", "--preset", "smoke", f"run.dir={two}", *STEPS, "train.parallel=data")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "processes=2" in res.stdout and "8 x 1 accumulation x 2 processes" in res.stdout
    for name in MODELS:
        a, b = _weights(reference, name), _weights(two, name)
        # Same batches and the same global-mean loss; only the order of float sums differs (all-reduce vs
        # one process), which Adam amplifies a little over 30 steps: 1e-4 is >100x below a one-step change.
        assert _max_diff(a, b) < 1e-4
    assert json.loads((two / "stages" / "train.json").read_text())["info"]["parallel"] == "data"


def test_original_and_oracle_differ_and_learn(reference):
    assert _max_diff(_weights(reference, "original"), _weights(reference, "oracle")) > 1e-3
    rec = json.loads((reference / "stages" / "train.json").read_text())
    assert rec["info"]["models"]["original"]["steps"] == 30
    assert rec["info"]["models"]["original"]["sequences"] > rec["info"]["models"]["oracle"]["sequences"]
    assert rec["info"]["parallel"] == "data"  # one process: the one loop


def test_killed_training_resumes_to_identical_weights(reference, prepared, tmp_path):
    run = _copy_prepared(prepared, tmp_path / "killed")
    cmd = [sys.executable, "-m", "unlearnbench", "train", "--preset", "smoke", f"run.dir={run}", *STEPS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    marker = run / "checkpoints" / "original"
    while time.time() < deadline and not list(marker.glob("step_*/complete.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(marker.glob("step_*/complete.json")), "no checkpoint was written before the kill"
    assert not (run / "models" / "original").exists()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resuming from step" in res.stdout
    for name in MODELS:
        assert _max_diff(_weights(reference, name), _weights(run, name)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# job-parallel: the rule


@pytest.mark.parametrize("choice, processes, untrained, sharded, mode", [
    ("auto", 1, 2, False, "data"),     # one process: nothing to share
    ("auto", 2, 2, False, "jobs"),     # original + oracle on 2 processes
    ("auto", 2, 6, False, "jobs"),     # + 4 shadow models
    ("auto", 4, 2, False, "data"),     # fewer models than processes: every model on all of them
    ("auto", 2, 1, False, "data"),     # a resumed run with one model left
    ("auto", 2, 0, False, "data"),
    ("auto", 2, 6, True, "data"),      # ZeRO / FSDP shards the model: data-parallel
    ("jobs", 4, 2, False, "jobs"),     # forced: two processes idle, still no collective in a loop
    ("jobs", 1, 2, False, "data"),     # one process: the same loop either way
    ("data", 2, 6, False, "data"),
])
def test_parallel_rule(choice, processes, untrained, sharded, mode):
    from unlearnbench.stages.train import parallel_rule

    assert parallel_rule(choice, processes, untrained, sharded) == mode


def _fake_acc(distributed_type: str, zero: int | None = None, processes: int = 2, mixed_precision: str = "no"):
    plugin = None if zero is None else SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero}})
    return SimpleNamespace(num_processes=processes, distributed_type=f"DistributedType.{distributed_type}",
                           state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision=mixed_precision)


@pytest.mark.parametrize("acc", [_fake_acc("DEEPSPEED", zero=2), _fake_acc("DEEPSPEED", zero=3), _fake_acc("FSDP")],
                         ids=["zero2", "zero3", "fsdp"])
def test_forced_models_is_refused_on_a_sharded_launch(acc):
    from unlearnbench.errors import UserError
    from unlearnbench.stages.train import parallel_mode

    with pytest.raises(UserError, match=r"train.parallel=jobs .* shards the model .* Use train.parallel=data"):
        parallel_mode(acc, "jobs", 6)
    assert parallel_mode(acc, "auto", 6) == "data"
    assert parallel_mode(_fake_acc("MULTI_CPU"), "auto", 6) == "jobs"
    assert parallel_mode(_fake_acc("DEEPSPEED", zero=0), "auto", 6) == "jobs"  # DeepSpeed without ZeRO: whole


@pytest.mark.parametrize("acc, sharded, weights", [
    (_fake_acc("MULTI_CPU"), False, False), (_fake_acc("NO", processes=1), False, False),
    (_fake_acc("DEEPSPEED", zero=0), False, False),  # DeepSpeed without ZeRO: every rank holds the whole model
    (_fake_acc("DEEPSPEED", zero=1), True, False), (_fake_acc("DEEPSPEED", zero=2), True, False),
    (_fake_acc("DEEPSPEED", zero=3), True, True), (_fake_acc("FSDP"), True, True)],
    ids=["ddp", "one", "deepspeed-no-zero", "zero1", "zero2", "zero3", "fsdp"])
def test_is_sharded(acc, sharded, weights):
    """ZeRO > 0 or FSDP shards the model; only ZeRO-3 and FSDP shard the weights themselves."""
    from unlearnbench.distributed import is_sharded

    assert is_sharded(acc) is sharded and is_sharded(acc, weights=True) is weights


def test_forced_models_is_refused_with_fp16():
    from unlearnbench.errors import UserError
    from unlearnbench.stages.train import parallel_mode

    acc = _fake_acc("MULTI_GPU", mixed_precision="fp16")
    with pytest.raises(UserError, match="fp16"):
        parallel_mode(acc, "jobs", 2)
    assert parallel_mode(acc, "auto", 2) == "data"
    assert parallel_mode(_fake_acc("MULTI_GPU", mixed_precision="bf16"), "auto", 2) == "jobs"


@pytest.mark.slow
def test_forced_jobs_with_deepspeed_exits_2(prepared, tmp_path):
    """The same refusal through a real ZeRO-2 launch: exit 2 and the fix, before any training."""
    run = _copy_prepared(prepared, tmp_path / "zero2")
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))}
    res = launch("train", "--preset", "smoke", f"run.dir={run}", "train.parallel=jobs",
                 config="cpu_deepspeed_zero2.yaml", env=env)
    assert res.returncode != 0
    assert "train.parallel=jobs" in res.stderr and "Use train.parallel=data" in res.stderr
    assert not (run / "models").exists()


# ---------------------------------------------------------------------------------------------------------------
# job-parallel: the loop, in this process


def _inputs(prepared):
    from unlearnbench.data.build import load_examples, load_tokenizer

    return load_examples(prepared[1] / "data"), load_tokenizer(prepared[1] / "data")


class _Stop(Exception):
    pass


class _StopAt:
    """A tracker that interrupts training when it is asked to log `step` (after the checkpoint before it)."""

    def __init__(self, step: int):
        self.step = step

    def log(self, values, step, **context):
        if step == self.step:
            raise _Stop


def test_job_parallel_loop_is_bit_identical_to_the_accelerate_loop(prepared, tmp_path, one_thread):
    """The job-parallel loop (no wrapper, no accelerate.backward / clip / accumulate) against the 1-process data
    path, with 4 micro-batches of accumulation, clipping and checkpoints on the way: the same bytes."""
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.stages.train import train_model

    examples, tok = _inputs(prepared)
    cfg = smoke_config(tmp_path / "cfg", "train.steps=12", "train.micro_batch_size=4", "train.checkpoint_every=5",
                       "train.log_every=4", "train.grad_clip=0.5")
    acc = make_accelerator()
    infos = {}
    for job_parallel in (False, True):
        infos[job_parallel] = train_model(acc, cfg, tmp_path / str(job_parallel), "oracle", examples, tok,
                                          job_parallel=job_parallel)
    assert infos[True]["grad_accum"] == infos[False]["grad_accum"] == 4
    assert _same_bytes(tmp_path / "False", tmp_path / "True", "oracle")
    assert not (tmp_path / "True" / "checkpoints" / "oracle").exists()  # removed once the model is saved


@pytest.mark.parametrize("first, second", [(True, True), (True, False), (False, True)],
                         ids=["jobs-jobs", "jobs-data", "data-jobs"])
def test_interrupted_training_resumes_in_either_mode(prepared, tmp_path, first, second, one_thread):
    """Interrupted at step 8 (last checkpoint: step 5) in one mode, resumed in the other: the uninterrupted
    weights, bit for bit. Job-parallel checkpoints use accelerate's file names, so either loop reads either."""
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.stages.train import train_model

    examples, tok = _inputs(prepared)
    cfg = smoke_config(tmp_path / "cfg", "train.steps=12", "train.micro_batch_size=8", "train.checkpoint_every=5",
                       "train.log_every=4")
    acc = make_accelerator()
    train_model(acc, cfg, tmp_path / "ref", "original", examples, tok, job_parallel=True)
    with pytest.raises(_Stop):
        train_model(acc, cfg, tmp_path / "run", "original", examples, tok, _StopAt(8), job_parallel=first)
    acc.free_memory()
    ckpt = tmp_path / "run" / "checkpoints" / "original"
    assert [p.name for p in ckpt.glob("step_*") if (p / "complete.json").exists()] == ["step_0000005"]
    assert not (tmp_path / "run" / "models" / "original").exists()
    train_model(acc, cfg, tmp_path / "run", "original", examples, tok, job_parallel=second)
    assert _same_bytes(tmp_path / "ref", tmp_path / "run", "original")


def test_job_parallel_resume_refuses_a_deepspeed_checkpoint(prepared, tmp_path):
    from unlearnbench.errors import UserError
    from unlearnbench.stages.train import _load_local_checkpoint

    path = tmp_path / "step_0000005"
    (path / "pytorch_model").mkdir(parents=True)
    with pytest.raises(UserError, match="DeepSpeed checkpoint"):
        _load_local_checkpoint(None, None, path)


# ---------------------------------------------------------------------------------------------------------------
# job-parallel: real 2-process launches


def test_job_parallel_two_processes_match_one_bit_for_bit(reference, prepared, tmp_path):
    two = _copy_prepared(prepared, tmp_path / "two")
    res = launch("train", "--preset", "smoke", f"run.dir={two}", *STEPS, "train.parallel=jobs")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "job-parallel" in res.stdout
    for name in MODELS:  # trained alone on one process each, with the 1-process arithmetic: the same bytes
        assert _same_bytes(reference, two, name), name
    info = json.loads((two / "stages" / "train.json").read_text())["info"]
    assert info["parallel"] == "jobs"
    assert {n: info["models"][n]["process_index"] for n in MODELS} == {"original": 0, "oracle": 1}
    assert info["models"]["original"]["num_processes"] == 1 and info["models"]["original"]["steps"] == 30
    # each process logged its own model's curve; the same losses as the 1-process run
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for name in MODELS:
        key = f"train/{name}/loss"
        # (the 1-process path sums the loss through a float32 tensor for its all-reduce; this one stays in Python)
        assert [r[key] for r in logged if key in r] == pytest.approx([r[key] for r in ref if key in r], rel=1e-6)
        assert [r["step"] for r in logged if key in r] == [10, 20, 30]
    assert not (two / "checkpoints" / "original").exists() and not (two / "checkpoints" / "oracle").exists()


@pytest.mark.slow
def test_killed_job_parallel_training_resumes_to_identical_weights(reference, prepared, tmp_path):
    """SIGKILL to the whole 2-process launch once both processes have a checkpoint; the relaunch resumes both
    models and ends on the 1-process weights, bit for bit."""
    run = _copy_prepared(prepared, tmp_path / "killed")
    args = ["train", "--preset", "smoke", f"run.dir={run}", *STEPS, "train.parallel=jobs"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "unlearnbench", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = [run / "checkpoints" / name for name in MODELS]
    deadline = time.time() + 300
    while time.time() < deadline and not all(list(m.glob("step_*/complete.json")) for m in markers):
        time.sleep(0.05)
    # torchrun starts each worker in a session of its own: kill the launcher and every worker, each by its pid
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    proc.wait()
    assert all(list(m.glob("step_*/complete.json")) for m in markers), "no checkpoint before the kill"
    assert not any((run / "models" / name / "config.json").exists() for name in MODELS)
    res = launch(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in MODELS:
        assert f"[train] {name}: resuming from step" in res.stdout
        assert _same_bytes(reference, run, name), name


def test_train_and_score_records_carry_flops_estimates(smoke_study):
    """Train: 6·N per trained token (tokens = every predicted position of every step's batch); score: 2·N per
    computed token slot; both in the stage records and in summary.json's cost block (the report's Cost table)."""
    from unlearnbench.data.build import load_examples
    from unlearnbench.evaluation import eval_subset

    cfg, run = smoke_study
    train = json.loads((run / "stages" / "train.json").read_text())["info"]
    lengths = [len(x) for x in load_examples(run / "data")["input_ids"]]
    for name, m in train["models"].items():
        assert m["flops"] == 6 * m["params"] * m["tokens_trained"]
        # every step predicts len - 1 tokens of each of its batch_size sequences
        assert m["steps"] * m["batch_size"] * (min(lengths) - 1) <= m["tokens_trained"]
        assert m["tokens_trained"] <= m["steps"] * m["batch_size"] * (max(lengths) - 1)
    assert train["flops"] == sum(m["flops"] for m in train["models"].values())
    score = json.loads((run / "stages" / "score.json").read_text())["info"]
    subset_tokens = sum(len(x) for x in eval_subset(load_examples(run / "data"))["input_ids"])
    params = train["models"]["original"]["params"]
    for name, p in score["passes"].items():
        assert p["flops"] == 2 * params * p["token_slots"] and p["token_slots"] >= subset_tokens
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cost"]["stages"]["train"]["flops"] == train["flops"]
    assert summary["cost"]["stages"]["score"]["flops"] == score["flops"]
    assert "est. FLOPs" in (run / "report" / "report.md").read_text()
