"""The pretrained path (`model.name_or_path`), exercised on a local directory written by save_pretrained."""

import json
import shutil

from safetensors.torch import load_file

from conftest import smoke_config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.models import build_model
from unlearnbench.study import run_study


def test_local_pretrained_model_is_fine_tuned_with_its_own_tokenizer(prepared, tmp_path):
    cfg, src = prepared
    base = tmp_path / "base_model"
    tok = load_tokenizer(src / "data")
    model = build_model(cfg, len(tok), seed=11)
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    run = tmp_path / "run"
    pcfg = smoke_config(run, f"model.name_or_path={base}", "train.steps=6", "train.checkpoint_every=100",
                        "data.n_train=200", "data.n_retain=20")
    run_study(pcfg, "prepare")
    man = json.loads((run / "data/manifest.json").read_text())
    assert man["tokenizer"] == str(base)
    # the model's own tokenizer: the same ids as the base tokenizer gives
    ex = load_examples(run / "data")
    row = ex[0]
    assert row["input_ids"][1:] == tok.encode(row["text"], add_special_tokens=False)[: len(row["input_ids"]) - 1]
    run_study(pcfg, "train")
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(run / "models/original/model.safetensors"))
    assert before.keys() == after.keys()
    # fine-tuning starts from the pretrained weights: moved, but only a little in 6 steps
    diffs = [float((before[k] - after[k]).abs().max()) for k in before]
    assert 0 < max(diffs) < 0.5
    shutil.rmtree(base)


def test_pickle_weights_are_refused(prepared, tmp_path):
    import pytest

    from unlearnbench.errors import UserError
    from unlearnbench.models import load_pretrained

    cfg, _ = prepared
    model = build_model(cfg, 2048, seed=1)
    import torch

    (tmp_path / "pickled").mkdir()
    model.config.save_pretrained(str(tmp_path / "pickled"))
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # a pickle checkpoint only
    with pytest.raises(UserError, match="safetensors"):
        load_pretrained(str(tmp_path / "pickled"))


def test_no_unsafe_loading_in_the_source():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "unlearnbench"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "torch.load(" not in text and "pickle.load" not in text
    assert "trust_remote_code=True" not in text
    assert "register_for_checkpointing" not in text  # accelerate reloads those with weights_only=False
