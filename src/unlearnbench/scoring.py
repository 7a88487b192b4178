"""The sharded scoring pass: per-example losses for every example, identical for any number of processes.

It knows nothing of exposure or unlearning: it turns (model, examples with scored spans) into per-example
`nll_sum`, `n_tokens`, `nll` and `accuracy` (token accuracy). Examples are sorted by length (little padding) and cut
into batches of at most `batch_size` examples and `batch_tokens` padded tokens (`length_batches`); every process
makes the same batches and scores every `world`-th of them, so an example's batch, and with it its numbers, is the
same for any number of processes. Per-example sums are reduced on the device and gathered once at the end.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from unlearnbench.batching import IGNORE, collate, length_batches
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


def auto_batch_tokens(acc, model) -> int:
    """The token budget per forward when `score.batch_tokens` is not set: 2**22 logits (16 MiB in float32) on a CPU,
    2**28 on a GPU, divided by the vocabulary. On a CPU the output layer's logits of a batch must stay in cache:
    measured on the default model (vocabulary 4,096, one thread), a canary evaluation scores fastest at 512-2,048
    padded tokens per forward and an ID one at 1,024, both 18-26% faster than 64 examples a batch, and 4,096 tokens is
    slower again (benchmarks/README.md). A GPU wants large batches; its number is a memory bound, not yet measured."""
    config = getattr(acc.unwrap_model(model), "config", None)
    vocab = int(getattr(config, "vocab_size", None) or 32_000)
    return max(1, (1 << (28 if acc.device.type == "cuda" else 22)) // vocab)


def _collate(idx: list[int], ids: list, starts: list, ends: list, pad_id: int, real: bool) -> dict:
    batch = collate([ids[i] for i in idx], [starts[i] for i in idx], [ends[i] for i in idx], pad_id)
    # a dummy batch (see `_my_batches`) carries row -1: its results are dropped after the gather
    batch["row"] = torch.tensor(idx if real else [-1] * len(idx), dtype=torch.long)
    return batch


def _my_batches(batches: list[list[int]], acc, local: bool) -> list[tuple[list[int], bool]]:
    """This process's (batch, real) pairs: all of them when `local`, else every `world`-th from its rank. Every
    process runs the same number of forwards (DeepSpeed ZeRO-3 and FSDP gather parameters inside each one, and the
    token pass gathers per round): a process one batch short repeats the smallest batch as a dummy."""
    if local or acc.num_processes == 1:
        return [(b, True) for b in batches]
    mine = [(b, True) for b in batches[acc.process_index::acc.num_processes]]
    rounds = -(-len(batches) // acc.num_processes)
    return mine + [(batches[0], False)] * (rounds - len(mine))


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
    """How the output layer can run on the scored positions alone, or None (the full forward).

    The output layer dominates a small model's cost (vocabulary x hidden per position), and most positions of a
    batch are not scored (padding; a canary's prefix). (body, lm_head) for a plain, unwrapped model on one device
    or under DDP: the body's hidden states at the scored positions go through lm_head. (None, lm_head) for a
    DDP-wrapped model (data-parallel unlearning): the wrapper's own forward runs, so DDP prepares its gradient
    all-reduce as usual, with lm_head projecting only the scored positions for that call (`_scored_only`). A
    DeepSpeed engine or an FSDP-sharded model runs its own forward unchanged: it gathers the parameters.
    """
    from accelerate.utils import DistributedType

    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    inner = model.module if ddp else model
    if type(inner).__name__ not in _PLAIN_HEAD:
        return None
    if not local and acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                  DistributedType.MULTI_GPU):
        return None
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(inner.config, "final_logit_softcapping", None):
        return None
    return (None, head) if ddp else (getattr(inner, inner.base_model_prefix), head)


@contextmanager
def _scored_only(lm_head: torch.nn.Linear, mask: torch.Tensor):
    """For the calls inside: `lm_head` takes the [batch, len, hidden] states and projects only those at `mask`'s
    positions ([batch, len - 1]: position i predicts token i + 1), returning [n_scored, vocab]."""
    own = lm_head.__dict__.get("forward")  # an instance-level forward someone else set, kept as it was
    project = lm_head.forward
    lm_head.forward = lambda hidden: project(hidden[:, :-1][mask])
    try:
        yield
    finally:
        if own is None:
            del lm_head.forward
        else:
            lm_head.forward = own


def _scored_logits(model, batch: dict, head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float logits at the scored positions only ([n_scored, vocab]), their target tokens and the [batch, len - 1]
    mask of those positions. With `head` (from `split_head`) the output layer itself runs on those positions only."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if head is None:
        logits = model(**inputs).logits[:, :-1][mask]
    elif head[0] is None:  # DDP-wrapped: its forward, the output layer on the scored positions
        with _scored_only(head[1], mask):
            logits = model(**inputs).logits
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


def _scoring_batches(acc, model, dataset, batch_size: int, batch_tokens: int | None, pad_id: int,
                     vocab_size: int | None, local: bool):
    """The checked columns of `dataset` as plain lists, its input ids, and this process's collated batches (a
    generator of (batch on the device, real))."""
    # Plain lists once, in one bulk Arrow conversion: a lazy `datasets` column costs ~0.2 ms a row lookup
    if not isinstance(dataset, dict) and all(c in dataset.column_names for c in REQUIRED):
        dataset = dataset.select_columns(list(REQUIRED)).to_dict()
    check_scorable(dataset, vocab_size)
    if batch_size < 1 or (batch_tokens is not None and batch_tokens < 0):
        raise UserError(f"score.batch_size={batch_size} and score.batch_tokens={batch_tokens}: the batch size must be "
                        "a positive number of examples and the token budget a positive number of tokens, 0 (no "
                        "budget) or null (automatic).")
    ids = list(dataset["input_ids"])
    starts, ends = list(dataset["score_start"]), list(dataset["score_end"])
    budget = auto_batch_tokens(acc, model) if batch_tokens is None else batch_tokens
    mine = _my_batches(length_batches([len(x) for x in ids], batch_size, budget), acc, local)
    batches = (({k: v.to(acc.device) for k, v in _collate(b, ids, starts, ends, pad_id, real).items()}, real)
               for b, real in mine)
    return dataset, ids, batches


def _gather_rows(acc, table: torch.Tensor, local: bool) -> torch.Tensor:
    """Every process's per-example rows (column 0 the row index) on every process, dummy rows (-1) dropped."""
    if not local and acc.num_processes > 1:
        table = acc.gather(acc.pad_across_processes(table, dim=0, pad_index=-1))
    return table[table[:, 0] >= 0]


@torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters here that a later training forward reuses
def score_pass(acc, model, dataset, batch_size: int = 64, pad_id: int = 0, vocab_size: int | None = None,
               local: bool = False, batch_tokens: int | None = None) -> tuple[pd.DataFrame, PassStats]:
    """Per-example scores of `model` on every example of `dataset`, sorted by example_id, on all processes.

    Batches hold at most `batch_size` examples and `batch_tokens` padded tokens (None: `auto_batch_tokens`; 0: no
    budget). `local=True` scores everything in this process alone (no sharding, no collectives): job-parallel
    unlearning, where each process evaluates its own model copy.
    """
    t0 = time.perf_counter()
    dataset, ids, batches = _scoring_batches(acc, model, dataset, batch_size, batch_tokens, pad_id, vocab_size, local)
    was_training = model.training
    model.eval()
    parts, slots = [], 0
    head = split_head(acc, model, local)
    for batch, real in batches:
        parts.append(_per_example(model, batch, head))
        slots += batch["input_ids"].numel() if real else 0
    if was_training:
        model.train()
    mine = torch.cat(parts) if parts else torch.zeros((0, 4), dtype=torch.float64, device=acc.device)
    table = _gather_rows(acc, mine, local).cpu().numpy()
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


TOKEN_COLUMNS = ("token_logp", "token_mu", "token_sigma")


def _token_stats(logits: torch.Tensor, wanted: torch.Tensor, chunk_elems: int = 1 << 24):
    """Per scored position: log p(target), and the mean and standard deviation of log p over the vocabulary
    under the next-token distribution (mu = sum_v p log p, sigma^2 = sum_v p (log p - mu)^2), in float32.
    Positions go through in chunks of about `chunk_elems` logits, so the temporaries stay at that size."""
    n, vocab = logits.shape
    step = max(1, chunk_elems // max(1, vocab))
    out = torch.empty((3, n), dtype=torch.float32, device=logits.device)
    for a in range(0, n, step):
        logp = torch.log_softmax(logits[a:a + step].float(), dim=-1)
        p = logp.exp()
        out[0, a:a + step] = logp.gather(1, wanted[a:a + step, None])[:, 0]
        # p = 0 where log p = -inf (a masked logit): 0 * inf would be NaN, the term is 0
        mu = torch.where(p > 0, p * logp, 0.0).sum(-1)
        out[1, a:a + step] = mu
        out[2, a:a + step] = torch.where(p > 0, p * (logp - mu[:, None]).square(), 0.0).sum(-1).sqrt()
    return out


def _per_example_tokens(model, batch: dict, head) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, nll_sum, n_tokens) per example ([batch, 3], float64) and its scored positions' log p, mu and sigma
    left-aligned and zero-padded to the batch's longest scored span ([batch, 3, max n_tokens], float32)."""
    logits, wanted, mask = _scored_logits(model, batch, head)
    owner = mask.nonzero()[:, 0]  # the example each scored position belongs to (row-major: in position order)
    slot = mask.long().cumsum(1)[mask] - 1  # its index among that example's scored positions
    n_tok = mask.sum(1)
    tok = _token_stats(logits, wanted)
    width = int(n_tok.max().item()) if n_tok.numel() else 0
    per_tok = torch.zeros((mask.size(0), 3, width), dtype=torch.float32, device=logits.device)
    per_tok[owner, :, slot] = tok.T
    nll = torch.zeros(mask.size(0), dtype=torch.float64, device=logits.device).index_add_(
        0, owner, -tok[0].double())
    return torch.stack([batch["row"].double(), nll, n_tok.double()], dim=1), per_tok


@torch.no_grad()
def token_score_pass(acc, model, dataset, batch_size: int = 64, pad_id: int = 0, vocab_size: int | None = None,
                     local: bool = False, batch_tokens: int | None = None) -> pd.DataFrame:
    """Per-example losses and per-token statistics of `model` on every example of `dataset`, for the
    membership-inference attacks (metrics.mia), in one sharded pass; sorted by example_id, on all processes.

    Columns: `example_id`, `nll_sum`, `n_tokens`, `nll` (as `score_pass`), and per scored position, in order,
    float32 arrays `token_logp` (log p of the token), `token_mu` and `token_sigma` (mean and standard deviation
    of log p over the vocabulary under the model's next-token distribution there, for Min-K%++). Batches, `local`
    and `batch_tokens` as in `score_pass`. The same for any number of processes.
    """
    dataset, ids, batches = _scoring_batches(acc, model, dataset, batch_size, batch_tokens, pad_id, vocab_size, local)
    was_training = model.training
    model.eval()
    head = split_head(acc, model, local)
    tables, tokens = [], []
    for batch, _ in batches:
        per_example, per_tok = _per_example_tokens(model, batch, head)
        if not local and acc.num_processes > 1:  # ragged: pad to this round's widest span and most rows, gather
            per_tok = acc.pad_across_processes(acc.pad_across_processes(per_tok, dim=2), dim=0)
            per_example = acc.pad_across_processes(per_example, dim=0, pad_index=-1)
            per_example, per_tok = acc.gather((per_example, per_tok))
        keep = per_example[:, 0] >= 0  # dummy and padding rows carry row -1
        per_example, per_tok = per_example[keep].cpu().numpy(), per_tok[keep].cpu().numpy()
        tables.append(per_example)
        tokens += [t[:, : int(n)] for t, n in zip(per_tok, per_example[:, 2])]
    if was_training:
        model.train()
    table = np.concatenate(tables) if tables else np.zeros((0, 3))
    rows = table[:, 0].astype(np.int64)
    if len(rows) != len(ids) or len(np.unique(rows)) != len(ids):
        raise RuntimeError(f"token scoring pass returned {len(rows)} rows ({len(np.unique(rows))} unique) for "
                           f"{len(ids)} examples")
    df = pd.DataFrame({"example_id": np.asarray(dataset["example_id"])[rows], "nll_sum": table[:, 1],
                       "n_tokens": table[:, 2].astype(np.int64)})
    df["nll"] = df["nll_sum"] / df["n_tokens"].clip(lower=1)
    for j, col in enumerate(TOKEN_COLUMNS):
        df[col] = [np.ascontiguousarray(t[j]) for t in tokens]
    return df.sort_values("example_id", kind="stable").reset_index(drop=True)
