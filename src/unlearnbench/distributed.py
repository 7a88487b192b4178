"""The Accelerator, its guards against silent misconfiguration, a description of the setup, and running a step on
the main process with its answer (or its refusal) on every process."""

from __future__ import annotations

import os
import platform
import shlex
from typing import Any, Callable

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from unlearnbench.errors import UserError


def make_accelerator(expected_processes: int | None = None, **kwargs: Any) -> Accelerator:
    """An Accelerator on gloo when CUDA is absent (DeepSpeed on CPU needs it), after the launch checks."""
    handlers = list(kwargs.pop("kwargs_handlers", []))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or _env_true("ACCELERATE_USE_DEEPSPEED")
    if distributed and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    check_launch_env()
    acc = Accelerator(kwargs_handlers=handlers, **kwargs)
    check_backend_kept(acc)
    check_world_size(acc, expected_processes)
    return acc


def check_backend_kept(acc: Accelerator) -> None:
    """Fail when the launch asked for DeepSpeed or FSDP and Accelerate quietly set up something else."""
    from accelerate.utils import DistributedType

    for env, want, name in (("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED, "DeepSpeed"),
                            ("ACCELERATE_USE_FSDP", DistributedType.FSDP, "FSDP")):
        if not _env_true(env) or acc.distributed_type == want:
            continue
        why = (f"Accelerate did not enable {name} on this machine. Check the accelerate config and that "
               f"{'deepspeed is installed' if name == 'DeepSpeed' else 'CUDA devices are visible'}.")
        raise UserError(f"The accelerate config asks for {name}, but this launch runs as "
                        f"{acc.distributed_type.value}: {why}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_launch_env() -> None:
    """Fail loudly on launches Accelerate would quietly change: `--multi_gpu` without CUDA and without
    ACCELERATE_USE_CPU (N independent runs), ACCELERATE_USE_CPU with a DeepSpeed or FSDP config (dropped), FSDP
    without CUDA (not sharded)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = _env_true("ACCELERATE_USE_CPU")
    is_deepspeed = _env_true("ACCELERATE_USE_DEEPSPEED")
    for env, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if use_cpu and _env_true(env):
            raise UserError(
                f"The accelerate config asks for {name}, but ACCELERATE_USE_CPU=1 is set, and with it Accelerate "
                f"drops {name} without a word. "
                + ("Unset it for a DeepSpeed config (`env -u ACCELERATE_USE_CPU accelerate launch ...`): DeepSpeed "
                   "runs on CPU through accelerate_configs/cpu_deepspeed_zero2.yaml / cpu_deepspeed_zero3.yaml."
                   if name == "DeepSpeed" else
                   "FSDP needs GPUs; for sharding on CPU launch accelerate_configs/cpu_deepspeed_zero3.yaml "
                   "without ACCELERATE_USE_CPU."))
    if _env_true("ACCELERATE_USE_FSDP") and not torch.cuda.is_available():
        raise UserError(
            "The accelerate config asks for FSDP, but there is no CUDA device: FSDP in Accelerate needs GPUs (on "
            "CPU it would not shard). For sharding on CPU launch with accelerate_configs/cpu_deepspeed_zero3.yaml; "
            "for plain data parallelism `ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "accelerate_configs/cpu_ddp.yaml ...`.")
    if world > 1 and not torch.cuda.is_available() and not use_cpu and not is_deepspeed:
        raise UserError(
            f"This launch started {world} processes for multi-GPU training, but there is no CUDA device, so each "
            "process would run alone (N independent, non-distributed runs). For CPU data parallelism set "
            "ACCELERATE_USE_CPU=1: `ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "accelerate_configs/cpu_ddp.yaml -m unlearnbench ...`."
        )


def _launcher_requested_processes() -> int | None:
    """The --num_processes the parent `accelerate launch` was given, if it is one."""
    try:
        cmd = psutil.Process(os.getppid()).cmdline()
    except (psutil.Error, OSError):
        return None
    joined = " ".join(cmd)
    if "accelerate" not in joined or "launch" not in joined:
        return None
    for i, tok in enumerate(cmd):
        for flag in ("--num_processes", "--num-processes"):
            if tok == flag and i + 1 < len(cmd):
                return int(cmd[i + 1]) if cmd[i + 1].isdigit() else None
            if tok.startswith(flag + "="):
                val = tok.split("=", 1)[1]
                return int(val) if val.isdigit() else None
    return None


def check_world_size(acc: Accelerator, expected: int | None = None) -> None:
    """num_processes must equal WORLD_SIZE, the launcher's request and the config's `run.num_processes`."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world_env:
        raise UserError(
            f"Accelerate sees {acc.num_processes} process(es) but WORLD_SIZE={world_env}: the processes are not "
            "one distributed job. On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "accelerate_configs/cpu_ddp.yaml ...`; on GPUs check the accelerate config's distributed_type."
        )
    requested = _launcher_requested_processes()
    if requested is not None and requested != acc.num_processes:
        raise UserError(
            f"`accelerate launch` was asked for {requested} processes but started {acc.num_processes} "
            "(`--cpu` with --num_processes > 1 starts a single process). For CPU data parallelism use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` or "
            "`--config_file accelerate_configs/cpu_ddp.yaml`."
        )
    if expected is not None and expected != acc.num_processes:
        raise UserError(
            f"run.num_processes={expected} but this launch has {acc.num_processes} process(es). Launch with "
            f"--num_processes {expected}, or change run.num_processes."
        )


def zero_stage(acc: Accelerator) -> int:
    """DeepSpeed ZeRO stage, 0 when DeepSpeed is not in use."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_sharded(acc: Accelerator, weights: bool = False) -> bool:
    """Whether this launch shards the model: DeepSpeed ZeRO (stage > 0) or FSDP. `weights=True`: only launches that
    shard the weights themselves (ZeRO-3, FSDP), not just the optimizer state and gradients (ZeRO-1/2)."""
    return "FSDP" in str(acc.distributed_type) or zero_stage(acc) >= (3 if weights else 1)


def describe(acc: Accelerator) -> dict:
    """World size, backend, ZeRO stage, device and hardware, for logs and the saved config."""
    info = {
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "backend": getattr(acc.state, "backend", None),
        "zero_stage": zero_stage(acc),
        "mixed_precision": acc.mixed_precision,
        "device": str(acc.device),
        "cuda_devices": torch.cuda.device_count(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "launch_command": shlex.join(psutil.Process(os.getppid()).cmdline()) if acc.num_processes > 1 else None,
    }
    return info


def peak_memory_mib() -> dict:
    """Peak memory of this process: CPU max RSS and CUDA max allocated, in MiB."""
    import resource

    out = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def inference_model(acc: Accelerator, model):
    """A frozen model ready for forward passes on every rank: a DeepSpeed engine under ZeRO-3 (whose parameters are
    already partitioned by from_pretrained), the model on this process's device otherwise."""
    model.requires_grad_(False).eval()
    if zero_stage(acc) == 3:
        import deepspeed

        conf = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        engine, *_ = deepspeed.initialize(model=model, config=conf)
        engine.eval()
        return engine
    return model.to(acc.device)


def configure_deepspeed_batch(acc: Accelerator, micro: int, accum: int, grad_clip: float | None) -> None:
    """Tell DeepSpeed the batch geometry and clipping of this loop (its config holds "auto" placeholders, and it
    clips at 1.0 when the key is absent: 0 turns clipping off, as grad_clip=None does elsewhere)."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds.update({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
               "train_batch_size": micro * accum * acc.num_processes, "gradient_clipping": float(grad_clip or 0.0)})
    plugin.gradient_accumulation_steps = accum


def leave_process_group() -> None:
    """After work that finished on every rank: leave the process group together. A gloo group left to the
    interpreter's shutdown occasionally aborts a rank ("terminate called without an active exception", exit -6),
    which the launcher reports as a failed run. Nothing to do outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_main_or_fail(acc, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only; a UserError there is raised on every process (no hung barrier)."""
    from accelerate.utils import broadcast_object_list

    result: list[Any] = [None]
    own: UserError | None = None
    if acc.is_main_process:
        try:
            result = [("ok", fn())]
        except UserError as exc:
            result, own = [("error", str(exc))], exc
        except Exception as exc:  # anything else must not leave the other processes waiting at a barrier
            result = [("crash", f"{type(exc).__name__}: {exc}")]
            if acc.num_processes == 1:
                raise
    if acc.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    status, value = result[0]
    if status == "error":
        if own is not None:
            raise own  # the main process keeps the exception's own type (CorruptFileError, RunDirLocked, ...)
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"the main process failed: {value}")
    return value
