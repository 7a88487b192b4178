"""launch/slurm_multinode.sbatch under stand-ins for SLURM's commands, its "nodes" all on this machine.

The stand-ins do what SLURM does for the script: `srun` starts one copy of its command per task, in parallel, with
SLURM_NODEID / SLURM_PROCID / SLURM_LOCALID set per task, prefixes each task's lines with its number (--label) and
kills the other tasks when one fails (--kill-on-bad-exit); `scontrol show hostnames` names the hosts (the first,
rank 0's, is `localhost`); `scancel --signal=TERM` signals every process of the step (not srun, not the batch
shell). The environment is that of a 2-node allocation with one task per node.

Slow: the smoke study launched on 2 "nodes" x 1 CPU process (gloo over loopback) gives the scores and unlearning
curves of the one-process study, and a resubmission with the same RUN_DIR skips every finished stage.
Cheap: the script's syntax and directives, the launch command of each node (quoting of overrides), and a SIGTERM
to the batch shell (the time limit's `--signal=B:TERM@120`) reaching the tasks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, free_port

SBATCH = ROOT / "launch" / "slurm_multinode.sbatch"
NODES = 2

SRUN = r"""#!/bin/bash
# stand-in srun: the tasks of one job step, all on this machine
set -u
{ printf 'srun'; printf ' <%s>' "${@//$'\n'/\\n}"; echo; } >> "$STANDIN_DIR/calls"
ntasks=${SLURM_NTASKS:-1} label=0 kill_on_bad_exit=0
while [ $# -gt 0 ]; do
    case "$1" in
        --ntasks=*) ntasks="${1#*=}" ;;
        -n|--ntasks) ntasks="$2"; shift ;;
        -l|--label) label=1 ;;
        -K|--kill-on-bad-exit|--kill-on-bad-exit=1) kill_on_bad_exit=1 ;;
        -*) ;;
        *) break ;;
    esac
    shift
done
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }
pids=()
for ((t = 0; t < ntasks; t++)); do
    # the labeller belongs to srun, not to the task (a signal to the step's processes leaves it alone)
    if [ "$label" = 1 ]; then exec {out}> >(exec sed -u "s/^/$t: /"); else exec {out}>&1; fi
    (export SLURM_NODEID=$t SLURM_PROCID=$t SLURM_LOCALID=0 SLURM_STEP_ID=0; exec "$@") >&$out 2>&$out &
    pids+=($!)
    exec {out}>&-
    echo $! >> "$STANDIN_DIR/tasks"
done
rc=0
declare -A live
for p in "${pids[@]}"; do live[$p]=1; done
while [ ${#live[@]} -gt 0 ]; do
    for p in "${!live[@]}"; do
        kill -0 "$p" 2>/dev/null && continue
        st=0
        wait "$p" || st=$?
        unset "live[$p]"
        [ "$st" -gt "$rc" ] && rc=$st
        if [ "$st" != 0 ] && [ "$kill_on_bad_exit" = 1 ] && [ ${#live[@]} -gt 0 ]; then
            echo "srun: error: task exited with exit code $st; killing the other tasks" >&2
            for q in "${!live[@]}"; do kill -KILL $(descendants "$q") "$q" 2>/dev/null; done
        fi
    done
    sleep 0.2
done
exit $rc
"""

SCONTROL = r"""#!/bin/bash
{ printf 'scontrol'; printf ' <%s>' "$@"; echo; } >> "$STANDIN_DIR/calls"
case "$1 ${2:-}" in
    "show hostnames") echo localhost; echo node-2 ;;
    "requeue $SLURM_JOB_ID") ;;
    *) echo "scontrol stand-in: unsupported: $*" >&2; exit 1 ;;
esac
"""

SCANCEL = r"""#!/bin/bash
# stand-in scancel --signal=SIG JOBID: SIG to every process of the job's step (each task and what it started)
{ printf 'scancel'; printf ' <%s>' "$@"; echo; } >> "$STANDIN_DIR/calls"
[ "$1" = "--signal=TERM" ] && [ "$2" = "$SLURM_JOB_ID" ] || { echo "scancel stand-in: unsupported: $*" >&2; exit 1; }
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }
for t in $(cat "$STANDIN_DIR/tasks"); do
    kill -TERM "$t" $(descendants "$t") 2>/dev/null
done
exit 0
"""


def _stand_ins(tmp_path: Path, **extra: str) -> Path:
    """A directory of stand-in executables (srun, scontrol, scancel and any `extra` name: body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"srun": SRUN, "scontrol": SCONTROL, "scancel": SCANCEL, **extra}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _job_env(tmp_path: Path, job_id: int, run_dir: Path, submit_dir: Path = ROOT, **extra: str) -> dict:
    """What sbatch hands the batch script of a 2-node job (one task per node), stand-ins first on PATH. The
    script activates `<submit_dir>/.venv`: with a stand-in `accelerate`, submit from elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_", "SLURM_", "TORCHELASTIC_"))
           and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MAIN_IP", "RUN_DIR")}
    standin_dir = tmp_path / "standin"
    standin_dir.mkdir(exist_ok=True)
    (standin_dir / "tasks").write_text("")
    return {**env,
            "PATH": f"{_stand_ins(tmp_path)}:{os.environ['PATH']}",
            "STANDIN_DIR": str(standin_dir),
            "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NUM_NODES": str(NODES), "SLURM_NNODES": str(NODES),
            "SLURM_JOB_NODELIST": "node-[1-2]", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": str(NODES),
            "SLURM_SUBMIT_DIR": str(submit_dir),
            # one CPU process per "node"; gloo, so ACCELERATE_USE_CPU=1 (else MULTI_GPU starts independent runs)
            "GPUS_PER_NODE": "1", "CONFIG": "accelerate_configs/cpu_ddp.yaml", "ACCELERATE_USE_CPU": "1",
            "RUN_DIR": str(run_dir), "MAIN_PORT": str(free_port()),
            "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the batch shell and everything it started (the tasks' workers run in sessions of their own)."""
    import psutil

    try:
        procs = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _start(env: dict, *args: str) -> subprocess.Popen:
    """The batch script as SLURM runs it on the first node of the allocation."""
    return subprocess.Popen(["bash", str(SBATCH), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=env["SLURM_SUBMIT_DIR"])


def _sbatch(env: dict, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run the batch script to its end; on a timeout its whole process tree is killed."""
    proc = _start(env, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"launch/slurm_multinode.sbatch {' '.join(args)}: no end after {timeout}s\n"
                    + "\n".join((out + err).splitlines()[-40:]), pytrace=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _calls(env: dict) -> list[str]:
    return (Path(env["STANDIN_DIR"]) / "calls").read_text().splitlines()


def _tail(res: subprocess.CompletedProcess, n: int = 40) -> str:
    return "\n".join((res.stdout + "\n" + res.stderr).splitlines()[-n:])


# ---------------------------------------------------------------------------------------------------------------
# cheap


def test_sbatch_parses_and_asks_for_a_safe_stop():
    res = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    directives = [ln.split(None, 1)[1] for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH ")]
    # SIGTERM to the batch shell 120 s before the time limit (it passes it on to the steps: see the script),
    # requeue after pre-emption / node failure, and the requeued attempts append to the same output file
    assert {"--signal=B:TERM@120", "--requeue", "--open-mode=append", "--ntasks-per-node=1"} <= set(directives)


def test_each_node_gets_its_launch(tmp_path):
    """Two tasks, started in parallel: machine ranks 0 and 1, rank 0 at the first host, overrides intact."""
    env = _job_env(tmp_path, 4242, tmp_path / "run", submit_dir=tmp_path)
    _stand_ins(tmp_path, accelerate="#!/bin/bash\nprintf '<%s>' \"$@\"; echo\n")
    res = _sbatch(env, "run", "--preset", "paper", "unlearn.request_kinds=[id, canary]", "--force", timeout=60)
    assert res.returncode == 0, _tail(res)
    assert f"rank 0 at localhost:{env['MAIN_PORT']}" in res.stdout
    for rank in range(NODES):
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"{rank}: <launch>"))
        for part in ("<--config_file><accelerate_configs/cpu_ddp.yaml>", "<--num_machines><2>",
                     "<--num_processes><2>", f"<--machine_rank><{rank}>", "<--main_process_ip><localhost>",
                     f"<--main_process_port><{env['MAIN_PORT']}>", "<--rdzv_backend><static>", "<--same_network>",
                     f"<-m><unlearnbench><run><run.dir={tmp_path / 'run'}><tracking.group=slurm-4242>"
                     "<--preset><paper><unlearn.request_kinds=[id, canary]><--force>"):
            assert part in line, (part, line)
    srun = [c for c in _calls(env) if c.startswith("srun")]
    assert len(srun) == 1 and "<--ntasks=2>" in srun[0] and "<--kill-on-bad-exit=1>" in srun[0]
    assert (tmp_path / "run").is_dir()
    # MAIN_IP overrides the first host
    env2 = {**_job_env(tmp_path, 4242, tmp_path / "run", submit_dir=tmp_path), "MAIN_IP": "10.1.2.3"}
    res = _sbatch(env2, "train", timeout=60)
    assert res.returncode == 0 and "<--main_process_ip><10.1.2.3>" in res.stdout, _tail(res)


def test_a_failed_node_fails_the_job(tmp_path):
    """--kill-on-bad-exit: node 1 fails at once, node 0 (which would wait for it) is killed, the job fails."""
    env = _job_env(tmp_path, 4243, tmp_path / "run", submit_dir=tmp_path)
    _stand_ins(tmp_path, accelerate='#!/bin/bash\n[ "$SLURM_NODEID" = 1 ] && exit 3\nexec sleep 120\n')
    t0 = time.monotonic()
    res = _sbatch(env, "run", timeout=60)
    assert res.returncode != 0, _tail(res)  # srun's exit status: the worst task's (3, or 137 for the killed one)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("requeue", [False, True])
def test_sigterm_to_the_batch_shell_reaches_every_task(tmp_path, requeue):
    """The time limit's SIGTERM (to the batch shell only) is passed on with `scancel --signal=TERM <job>` to the
    processes of every node; srun itself is not signalled (it would SIGKILL its tasks); the job exits 143 and,
    with AUTO_REQUEUE=1, requeues itself."""
    env = _job_env(tmp_path, 4244, tmp_path / "run", submit_dir=tmp_path,
                   **({"AUTO_REQUEUE": "1"} if requeue else {}))
    standin = Path(env["STANDIN_DIR"])
    # a "node": its process stops at a safe point on SIGTERM and exits 143
    _stand_ins(tmp_path, accelerate=(
        "#!/bin/bash\n"
        "trap 'echo \"node $SLURM_NODEID: SIGTERM, stopping\"; kill $child; exit 143' TERM\n"
        "sleep 120 & child=$!\n"
        "touch \"$STANDIN_DIR/ready.$SLURM_NODEID\"\n"
        "wait $child\n"))
    proc = _start(env, "run", "--preset", "smoke")
    try:
        deadline = time.monotonic() + 30
        while not all((standin / f"ready.{n}").exists() for n in range(NODES)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate(timeout=5)
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.communicate()
    assert proc.returncode == 143, (out, err)
    for n in range(NODES):
        assert f"{n}: node {n}: SIGTERM, stopping" in out, out
    assert "[slurm] stopped on SIGTERM" in err
    calls = _calls(env)
    assert "scancel <--signal=TERM> <4244>" in calls
    assert ("scontrol <requeue> <4244>" in calls) == requeue


# ---------------------------------------------------------------------------------------------------------------
# slow: the smoke study on two "nodes"


def _scores(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "scores" / f"{name}.parquet").sort_values("example_id").reset_index(drop=True)


def _curve(run_dir: Path, request: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "unlearn" / request / "curve.parquet")


def _requests(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "unlearn").iterdir() if (p / "curve.parquet").exists())


def _assert_matches(ref: Path, run: Path) -> None:
    """`run` has the one-process run's models, scores and unlearning curves, at the tolerances of
    test_backends.py (there: why they are what they are)."""
    for name in ("original", "oracle"):
        wa = load_file(str(ref / "models" / name / "model.safetensors"))
        wb = load_file(str(run / "models" / name / "model.safetensors"))
        assert set(wa) == set(wb)
        w_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        a, b = _scores(ref, name), _scores(run, name)
        assert list(a.example_id) == list(b.example_id)
        assert (a.n_tokens.to_numpy() == b.n_tokens.to_numpy()).all()
        diff = float(np.abs(a.nll - b.nll).max())
        print(f"[multinode] {name}: max |w_1 - w_2| = {w_diff:.2e}, max |nll_1 - nll_2| = {diff:.2e}")
        assert w_diff < 1e-4
        # Unlike test_backends' score check (the same weights scored by other ranks: 1e-5), these are two trainings
        # whose weights differ at the all-reduce's rounding, and an example's NLL moves with them: measured 3.8e-5
        # nats/token at max |Δw| 2.7e-5 on an Intel CPU (under 1e-5 where the bound was first set). A misassigned
        # or duplicated example, or a model trained on other batches, is off by more than 1e-2: 1e-3 separates them.
        assert diff < 1e-3
    ua = json.loads((ref / "scores" / "utility.json").read_text())
    ub = json.loads((run / "scores" / "utility.json").read_text())
    np.testing.assert_allclose(ua["original"]["id_holdout_ppl"], ub["original"]["id_holdout_ppl"], rtol=1e-4)
    assert _requests(run) == _requests(ref) and _requests(ref)
    for request in _requests(ref):
        a, b = _curve(ref, request), _curve(run, request)
        assert list(a.step) == list(b.step), request
        print(f"[multinode] unlearn {request}: max |Δuq| {float(np.abs(a.uq - b.uq).max()):.2e}")
        np.testing.assert_allclose(a.uq, b.uq, atol=1e-3)
        np.testing.assert_allclose(a.exposure_mean, b.exposure_mean, atol=1e-3)
        # Unlike assert_same_curve (conftest: one θ₀ unlearned by two backends), each run unlearns its own θ₀, and
        # the two θ₀ differ at the all-reduce's rounding (above); gradient ascent amplifies that as perplexity
        # climbs: measured 1.2e-4 relative at the last step of a request whose perplexity had risen 2.8x. A changed
        # update (DeepSpeed's clipping, conftest) moved perplexity by 2e-3: 5e-4 still separates them.
        np.testing.assert_allclose(a.id_holdout_ppl, b.id_holdout_ppl, rtol=5e-4)
        np.testing.assert_allclose(a.train_loss.dropna(), b.train_loss.dropna(), rtol=5e-4)


@pytest.mark.slow
def test_smoke_study_on_two_nodes_matches_and_resumes(smoke_study, tmp_path):
    _, ref = smoke_study
    run = tmp_path / "run"
    env = _job_env(tmp_path, 5101, run)
    t0 = time.monotonic()
    res = _sbatch(env, "run", "--preset", "smoke")
    first = time.monotonic() - t0
    print(f"[multinode] 2-node smoke study: {first:.0f}s\n{_tail(res, 15)}")
    assert res.returncode == 0, _tail(res)

    # One world of 2 processes across the 2 nodes: each node's process reports it (accelerate prints on each
    # node's local main process), the saved config records it, and job-parallel training put one model on each.
    for node in range(NODES):
        assert f"{node}: [setup] processes=2 type=MULTI_CPU backend=gloo" in res.stdout, _tail(res)
    dist = yaml.safe_load((run / "config.yaml").read_text())["distributed"]
    assert dist["num_processes"] == 2 and dist["backend"] == "gloo"
    assert "--num_machines 2" in dist["launch_command"] and "--machine_rank 0" in dist["launch_command"]
    train = json.loads((run / "stages" / "train.json").read_text())["info"]
    assert sorted(m["process_index"] for m in train["models"].values()) == [0, 1], train["models"]

    _assert_matches(ref, run)

    # Resubmission (a new job id, the same RUN_DIR): every computing stage is found done and skipped, nothing is
    # rewritten; the report (cheap, it reads what the stages wrote) is always redrawn.
    records = {p.name: p.read_bytes() for p in (run / "stages").glob("*.json") if p.name != "report.json"}
    env = _job_env(tmp_path, 5102, run)
    t0 = time.monotonic()
    res = _sbatch(env, "run", "--preset", "smoke")
    print(f"[multinode] resubmission: {time.monotonic() - t0:.0f}s\n{_tail(res, 15)}")
    assert res.returncode == 0, _tail(res)
    for stage in ("prepare", "train", "score", "unlearn", "attack"):
        assert f"0: [{stage}] already done for this config" in res.stdout, (stage, _tail(res))
    assert "trained in" not in res.stdout
    assert {p.name: p.read_bytes() for p in (run / "stages").glob("*.json") if p.name != "report.json"} == records


@pytest.mark.slow
def test_time_limit_signal_stops_both_nodes_and_the_resubmission_resumes(smoke_study, tmp_path):
    """SIGTERM to the batch shell during training (what `--signal=B:TERM@120` sends): each node's process stops
    at a safe point with a checkpoint, the job exits 143, and the resubmission resumes to the same results."""
    _, ref = smoke_study
    run = tmp_path / "run"
    env = _job_env(tmp_path, 5201, run)
    # checkpoints every 5 steps (numbers unchanged: a resume is bit-identical) so that the signal lands early in
    # training: 120 smoke steps take ~3 s on a quiet machine
    args = ("run", "--preset", "smoke", "train.checkpoint_every=5")
    proc = _start(env, *args)
    try:
        # job-parallel training (one model per node) has written its first checkpoint (step 5 of 120) on both
        deadline = time.monotonic() + 600
        while not all(list((run / "checkpoints" / m).glob("step_*/complete.json")) for m in ("original", "oracle")):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint of both models"
            time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        stop = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.communicate()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    (tmp_path / "job.out").write_text(out)  # the whole output, for a failure's post-mortem
    (tmp_path / "job.err").write_text(err)
    print(f"[multinode] SIGTERM to the batch shell: the job ended {stop:.1f}s later\n{_tail(res, 15)}")
    assert proc.returncode == 143, _tail(res)
    assert "[slurm] stopped on SIGTERM" in err
    # each node's process stopped at a safe point of its own model's training, checkpoint written (the line may
    # follow a progress bar's carriage return, so it is not always at the start of a labelled line)
    for model in ("original", "oracle"):
        assert any("unlearnbench: interrupted (SIGTERM) at train step" in ln and f"({model}), checkpoint written" in ln
                   for ln in out.splitlines()), _tail(res)
    assert not (run / "stages" / "train.json").exists()

    env = _job_env(tmp_path, 5202, run)
    t0 = time.monotonic()
    res = _sbatch(env, *args)
    print(f"[multinode] resubmission after the stop: {time.monotonic() - t0:.0f}s\n{_tail(res, 15)}")
    assert res.returncode == 0, _tail(res)
    _assert_matches(ref, run)
