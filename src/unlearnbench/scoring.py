"""The sharded scoring pass: per-example losses for every example, identical for any number of processes.

It knows nothing of exposure or unlearning: it turns (model, examples with scored spans) into per-example
`nll_sum`, `n_tokens`, `nll` and `accuracy` (token accuracy). Examples are sorted by length (little padding), dealt to processes
in batches by Accelerate's sharded data loader, reduced per example on the device, and gathered with
`gather_for_metrics`, which drops the duplicates that pad the last round of batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from unlearnbench.batching import IGNORE, collate
from unlearnbench.errors import UserError

REQUIRED = ("example_id", "input_ids", "score_start", "score_end")


@dataclass
class PassStats:
    """What a pass cost: examples, real and padded token slots, seconds."""

    examples: int
    tokens: int
    slots: int
    seconds: float

    @property
    def padding_fraction(self) -> float:
        """Share of the computed token slots that were padding."""
        return 1.0 - self.tokens / max(1, self.slots)


class _Sorted(Dataset):
    """Examples in length order; each item carries its row index so results can be keyed back."""

    def __init__(self, ids: list, starts: list, ends: list):
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        self.items = [(i, ids[i], starts[i], ends[i]) for i in order]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        return self.items[k]


def _collate(items, pad_id: int) -> dict:
    batch = collate([x[1] for x in items], [x[2] for x in items], [x[3] for x in items], pad_id)
    batch["row"] = torch.tensor([x[0] for x in items], dtype=torch.long)
    return batch


def check_scorable(dataset, vocab_size: int | None = None) -> None:
    """Clear errors for a dataset that cannot be scored."""
    cols = getattr(dataset, "column_names", None) or list(dataset.keys())
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise UserError(f"The dataset to score lacks column(s) {', '.join(missing)} (has: {', '.join(cols)}). "
                        "Score data written by `unlearnbench prepare`, which adds example_id and the scored span.")
    if len(dataset["example_id"]) == 0:
        raise UserError("The set to score is empty: there is nothing to evaluate. Check the data sizes in config.")
    if vocab_size is not None:
        top = max(max(s) for s in dataset["input_ids"] if len(s))
        if top >= vocab_size:
            raise UserError(f"Token id {top} is outside the model's vocabulary of {vocab_size}: the data was "
                            "tokenized for another model. Rerun prepare with this model's tokenizer.")


# Causal LMs whose logits are exactly `lm_head(last_hidden_state)`: no logit scaling or soft-capping
_PLAIN_HEAD = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
               "GPTNeoXForCausalLM"}


def split_head(acc, model, local: bool):
    """(body, lm_head) when the output layer can be applied to the scored positions alone, else None.

    The output layer dominates a small model's cost (vocabulary x hidden per position), and most positions of a
    batch are not scored (padding; a canary's prefix). Only for a plain, unwrapped model on one device or under
    DDP: a DeepSpeed engine or an FSDP-sharded model must run its own forward, which gathers the parameters.
    """
    from accelerate.utils import DistributedType

    if type(model).__name__ not in _PLAIN_HEAD:
        return None
    if not local and acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                  DistributedType.MULTI_GPU):
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(model.config, "final_logit_softcapping", None):
        return None
    return getattr(model, model.base_model_prefix), head


def _scored_logits(model, batch: dict, head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float logits at the scored positions only ([n_scored, vocab]), their target tokens and the [batch, len - 1]
    mask of those positions. With `head` (from `split_head`) the output layer itself runs on those positions only."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if head is None:
        logits = model(**inputs).logits[:, :-1][mask]
    else:
        body, lm_head = head
        logits = lm_head(body(**inputs).last_hidden_state[:, :-1][mask])
    return logits.float(), targets[mask], mask


def scored_logprobs(model, batch: dict, head) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each scored label token ([batch, len - 1], 0 elsewhere) and the float mask: the values of
    `batching.token_logprobs(model(...).logits, labels)`. Differentiable: the unlearning step's forget batch."""
    logits, wanted, mask = _scored_logits(model, batch, head)
    tok = -torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
    logp = torch.zeros(mask.shape, dtype=tok.dtype, device=tok.device).masked_scatter(mask, tok)
    return logp, mask.float()


def _per_example(model, batch: dict, head) -> torch.Tensor:
    """(row, nll_sum, n_tokens, n_correct) per example of a batch, reduced on the device."""
    logits, wanted, mask = _scored_logits(model, batch, head)
    owner = mask.nonzero()[:, 0]  # the example each scored position belongs to
    n = mask.size(0)
    tok_nll = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
    nll = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add_(0, owner, tok_nll.double())
    correct = torch.zeros(n, dtype=torch.long, device=logits.device).index_add_(
        0, owner, (logits.argmax(-1) == wanted).long())
    return torch.stack([batch["row"].double(), nll, mask.sum(1).double(), correct.double()], dim=1)


@torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters here that a later training forward reuses
def score_pass(acc, model, dataset, batch_size: int = 64, pad_id: int = 0,
               vocab_size: int | None = None, local: bool = False) -> tuple[pd.DataFrame, PassStats]:
    """Per-example scores of `model` on every example of `dataset`, sorted by example_id, on all processes.

    `local=True` scores everything in this process alone (no sharding, no collectives): request-parallel
    unlearning, where each process evaluates its own model copy.
    """
    t0 = time.perf_counter()
    # Plain lists once, in one bulk Arrow conversion: a lazy `datasets` column costs ~0.2 ms a row lookup
    if not isinstance(dataset, dict) and all(c in dataset.column_names for c in REQUIRED):
        dataset = dataset.select_columns(list(REQUIRED)).to_dict()
    check_scorable(dataset, vocab_size)
    ids = list(dataset["input_ids"])
    data = _Sorted(ids, list(dataset["score_start"]), list(dataset["score_end"]))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=lambda items: _collate(items, pad_id))
    if not local:
        loader = acc.prepare_data_loader(loader)
    was_training = model.training
    model.eval()
    gathered, slots = [], 0
    head = split_head(acc, model, local)
    for batch in loader:
        if local:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
        per_example = _per_example(model, batch, head)
        gathered.append((per_example if local else acc.gather_for_metrics(per_example)).cpu())
        slots += batch["input_ids"].numel()
    if was_training:
        model.train()
    table = torch.cat(gathered).numpy() if gathered else np.zeros((0, 4))
    rows = table[:, 0].astype(np.int64)
    if len(rows) != len(ids) or len(np.unique(rows)) != len(ids):
        raise RuntimeError(f"scoring pass returned {len(rows)} rows ({len(np.unique(rows))} unique) for "
                           f"{len(ids)} examples")
    df = pd.DataFrame({"example_id": np.asarray(dataset["example_id"])[rows], "nll_sum": table[:, 1],
                       "n_tokens": table[:, 2].astype(np.int64), "n_correct": table[:, 3].astype(np.int64)})
    df["nll"] = df["nll_sum"] / df["n_tokens"].clip(lower=1)
    df["accuracy"] = df["n_correct"] / df["n_tokens"].clip(lower=1)
    df = df.sort_values("example_id", kind="stable").reset_index(drop=True)
    total_slots = slots if local else int(acc.reduce(torch.tensor(slots, device=acc.device), reduction="sum").item())
    stats = PassStats(len(df), int(sum(len(s) for s in ids)), total_slots, time.perf_counter() - t0)
    return df, stats
