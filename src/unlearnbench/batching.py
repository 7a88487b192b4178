"""Deterministic batches: padding, length grouping, and splitting a global batch across processes."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

IGNORE = -100


def collate(seqs: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int], pad_id: int = 0) -> dict:
    """Right-padded input_ids, attention_mask and labels that are -100 outside each scored span."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (s, a, b) in enumerate(zip(seqs, starts, ends)):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        labels[i, a:b] = ids[i, a:b]
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def length_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices in length order (ties by index), cut into batches of at most `max_rows` examples and `max_tokens`
    padded tokens (examples x the longest, which is the last one added); 0 = no token cap. An example longer than
    `max_tokens` is a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) == max_rows or (max_tokens and (len(cur) + 1) * lengths[i] > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label token (shifted: position i predicts token i+1) and the float mask."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    safe = targets.clamp(min=0)
    logp = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), safe.reshape(-1),
                                              reduction="none").view_as(safe)
    return torch.where(mask, logp, torch.zeros_like(logp)), mask.float()


def training_schedule(lengths: np.ndarray, batch_size: int, seed: int, length_grouping: bool,
                      group_batches: int = 50) -> Iterator[list[int]]:
    """An endless, seed-determined stream of global batches (lists of mixture indices).

    With length grouping, each chunk of `group_batches` batches is sorted by length before it is cut, and the
    batch order is shuffled again: far less padding, still a random order of batches.
    """
    epoch = 0
    n = len(lengths)
    while True:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n)
        batches = []
        if length_grouping:
            chunk = batch_size * group_batches
            for c in range(0, n, chunk):
                part = perm[c:c + chunk]
                part = part[np.argsort(lengths[part], kind="stable")]
                batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
        for b in batches:
            if len(b) == batch_size:  # a short tail batch would change the effective batch size
                yield b.tolist()
        epoch += 1


def shard_batch(batch: list[int], lengths: np.ndarray, rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: sorted by length, dealt round-robin, cut into `micro`."""
    order = sorted(batch, key=lambda i: (lengths[i], i))
    mine = order[rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]
