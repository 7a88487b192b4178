"""Run by `accelerate launch` from test_scoring.py: one sharded pass, written by the main process."""

import sys

import datasets

from unlearnbench.distributed import make_accelerator
from unlearnbench.io import write_parquet
from unlearnbench.models import load_pretrained
from unlearnbench.scoring import score_pass

if __name__ == "__main__":
    model_dir, data_dir, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokens = int(sys.argv[5]) if len(sys.argv) > 5 else None
    acc = make_accelerator()
    model = load_pretrained(model_dir).to(acc.device)
    df, stats = score_pass(acc, model, datasets.load_from_disk(data_dir), batch_size=batch, batch_tokens=tokens)
    if acc.is_main_process:
        df["world"] = acc.num_processes
        df["slots"] = stats.slots
        write_parquet(out, df)
    from unlearnbench.distributed import leave_process_group

    leave_process_group()
