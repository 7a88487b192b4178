"""The state of one forget request: what it is (`Request`), the rows its steps draw from (`RequestData`),
everything a step needs (`Unlearner`) and what a step did (`StepResult`). The loop is `unlearn/request.py`."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from unlearnbench.batching import collate
from unlearnbench.config import Config
from unlearnbench.unlearn.methods import MethodParams, MethodSpec
from unlearnbench.unlearn.worker import Worker


@dataclass
class Request:
    """A forget request: a named set of forget examples unlearned together from θ₀."""

    name: str
    example_ids: list[str]
    kind: str
    repetitions: int
    group: int = 0  # the data column `group`: which of the data.replicates disjoint forget groups of its cell


@dataclass
class RequestData:
    """The rows a request's steps draw from: forget rows in a seeded order, the retain rows, token spans."""

    all_ids: list
    starts: list
    ends: list
    lengths: np.ndarray
    forget_rows: list[int]
    retain_rows: list[int]
    order: np.ndarray
    pad_id: int

    @classmethod
    def build(cls, cfg: Config, request: Request, columns: dict, pad_id: int) -> "RequestData":
        """From every prepared example as plain column lists (the stage converts them once)."""
        row_of = {e: i for i, e in enumerate(columns["example_id"])}
        all_ids, starts, ends = (columns[c] for c in ("input_ids", "score_start", "score_end"))
        forget_rows = [row_of[e] for e in request.example_ids]
        order = np.random.default_rng([cfg.run.seed, 104729]).permutation(len(forget_rows))
        return cls(all_ids, starts, ends, np.array([len(x) for x in all_ids]), forget_rows,
                   [i for i, s in enumerate(columns["split"]) if s == "retain"], order, pad_id)

    def batch(self, rows: list[int], device) -> dict:
        """Collated tensors of these rows on `device`."""
        b = collate([self.all_ids[i] for i in rows], [self.starts[i] for i in rows], [self.ends[i] for i in rows],
                    self.pad_id)
        return {k: v.to(device) for k, v in b.items()}

    def tokens(self, rows: list[int]) -> int:
        """Scored tokens of these rows."""
        return int(sum(self.ends[r] - self.starts[r] for r in rows))


@dataclass
class Unlearner:
    """Everything a step needs: the model being unlearned, its optimizer and schedule, the frozen θ₀ for methods
    that compare with it, the method, and how this process takes part."""

    cfg: Config
    worker: Worker
    data: RequestData
    model: Any
    opt: torch.optim.Optimizer
    sched: Any
    spec: MethodSpec
    params: MethodParams
    reference: Any = None
    head: Any = None
    ref_head: Any = None
    lora: Any = None  # the PeftModel around `model` when unlearn.lora.rank > 0 (unlearn/lora.py)

    def reference_mode(self):
        """The context θ₀'s forward runs in: with LoRA, the model itself with its adapters disabled."""
        if self.lora is None:
            return nullcontext()
        from unlearnbench.unlearn.lora import adapters_off

        return adapters_off(self.lora, self.reference)


@dataclass
class StepResult:
    """What one step did: its loss, gradient norm, the method's statistics, tokens, and why it was refused."""

    loss: float
    grad_norm: float
    stats: dict = field(default_factory=dict)
    tokens: int = 0
    collapsed: str | None = None  # the reason, when the update was refused (the request collapsed)
