"""Who runs a forget request and who writes what: one process alone on its own model copy (job-parallel: a job is
one request; no collective operation, it writes the request's files itself), or one rank of a data-parallel group
(DDP, DeepSpeed, FSDP), where the main process writes (README, "Launching with your own accelerate config")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearnbench.distributed import configure_deepspeed_batch, is_sharded, zero_stage
from unlearnbench.models import save_local_model, save_model


@dataclass
class Worker:
    """How this process takes part in a request: alone on its own model copy (`job_parallel`: no collective
    operation, it writes the request's files itself) or as one rank of a data-parallel group."""

    acc: Any
    job_parallel: bool

    @property
    def world(self) -> int:
        """Processes sharing this request's batches."""
        return 1 if self.job_parallel else self.acc.num_processes

    @property
    def rank(self) -> int:
        """This process's shard of each batch."""
        return 0 if self.job_parallel else self.acc.process_index

    @property
    def writes(self) -> bool:
        """Whether this process writes the request's files."""
        return self.job_parallel or self.acc.is_main_process

    @property
    def sharded(self) -> bool:
        """Whether the ranks hold the model sharded (DeepSpeed ZeRO or FSDP), so each saves and loads its shard."""
        return not self.job_parallel and is_sharded(self.acc)

    def prepare(self, model, opt, micro_batch: int, grad_clip: float | None):
        """Move (job-parallel) or wrap (DDP / DeepSpeed / FSDP) the model and optimizer."""
        if self.job_parallel:
            return model.to(self.acc.device), opt
        configure_deepspeed_batch(self.acc, micro_batch, 1, grad_clip)
        self.acc.gradient_accumulation_steps = 1
        return self.acc.prepare(model, opt)

    def backward(self, loss: torch.Tensor) -> float:
        """Backpropagate; the step's loss summed over the ranks' contributions (each is a share of the global)."""
        if self.job_parallel:
            loss.backward()
            return float(loss.detach())
        self.acc.backward(loss)
        return self.acc.reduce(loss.detach().float().reshape(1), reduction="sum").item() / self.world

    def clip_grad_norm(self, model, clip: float | None) -> float:
        """Clip (when `clip`) and return the global gradient norm; DeepSpeed clips inside its engine."""
        limit = clip if clip else float("inf")
        if self.job_parallel:
            return float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
        if self.acc.state.deepspeed_plugin is not None:
            norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
            return float(norm) if norm is not None else 0.0
        return float(self.acc.clip_grad_norm_(model.parameters(), limit))

    def eval_model(self, model):
        """The model the evaluator scores: unwrapped, except under ZeRO-3 (the engine gathers the shards)."""
        return model if self.job_parallel or zero_stage(self.acc) == 3 else self.acc.unwrap_model(model)

    def save(self, model, tok, path: Path) -> None:
        """Save the unlearned model as safetensors with its tokenizer."""
        if self.job_parallel:
            save_local_model(model, tok, path)
        else:
            save_model(self.acc, model, tok, path)

    def done(self) -> None:
        """Wait for the other ranks of a data-parallel request and release what Accelerate holds."""
        if not self.job_parallel:
            self.acc.wait_for_everyone()
            self.acc.free_memory()
