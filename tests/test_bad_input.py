"""Bad input at every entry point: a one-paragraph message naming the problem and the fix, exit 2, no traceback,
nothing half-written in the run directory."""

import json
import shutil

import pytest

from unlearnbench.cli import main


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.err


def files_in(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture()
def corpora(tmp_path):
    good = [json.dumps({"text": f"A passage of some length, number {i}, about nothing at all."}) for i in range(30)]
    (tmp_path / "missing_field.jsonl").write_text('{"body": "no text field here at all, none"}\n')
    (tmp_path / "malformed.jsonl").write_text("\n".join(good[:3]) + '\n{"text": oops}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "small.jsonl").write_text("\n".join(good))
    (tmp_path / "corpus.xml").write_text("<a/>")
    (tmp_path / "bad.yaml").write_text("train: [1,\n")
    (tmp_path / "unknown.yaml").write_text("train:\n  stepz: 3\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "through_list.yaml").write_text("data:\n  kinds:\n    x: 1\n")
    (tmp_path / "latin1.jsonl").write_bytes("\n".join(json.dumps({"text": f"passage {i} \u00e9"}, ensure_ascii=False)
                                                      for i in range(30)).encode("latin-1"))
    return tmp_path


CASES = [
    # (id, argv after the stage, words the message must contain)
    ("unknown-key", ["train.stepz=1"], ["train.stepz", "Allowed keys"]),
    ("unknown-section", ["trian.steps=1"], ["trian"]),
    ("wrong-type", ["train.steps=abc"], ["train.steps", "int"]),
    ("zero-size", ["data.group_size=0"], ["data.group_size", "positive"]),
    ("negative-lr", ["unlearn.lr=-1"], ["unlearn.lr", "> 0"]),
    ("negative-count", ["data.n_retain=-5"], ["data.n_retain"]),
    ("unknown-method", ["unlearn.method=magic"], ["magic", "npo"]),
    ("unknown-exposure", ["metrics.exposure=mean"], ["metrics.exposure", "extrapolated"]),
    ("unknown-optimizer", ["unlearn.optimizer=lion"], ["unlearn.optimizer", "adamw"]),
    ("bad-kinds", ["data.kinds=[id,poem]"], ["data.kinds"]),
    ("bad-repetitions", ["data.repetitions=[0,2]"], ["data.repetitions"]),
    ("retain-exceeds-train", ["data.n_retain=5000"], ["data.n_retain", "n_train"]),
    ("tokens-exceed-positions", ["data.max_tokens=500"], ["max_position_embeddings"]),
    ("heads-divide-hidden", ["model.n_heads=3"], ["n_heads"]),
    ("eval-every-too-large", ["unlearn.eval_schedule=every", "unlearn.eval_every=50"], ["eval_every", "max_steps"]),
    ("ids-without-ids", ["unlearn.requests=ids"], ["example_ids"]),
    ("unknown-request-kind", ["data.kinds=[id,canary]", "unlearn.request_kinds=[domain]"], ["request_kinds"]),
    ("uq-target-range", ["metrics.uq_target=1.5"], ["uq_target"]),
    ("section-given-a-value", ["unlearn.lora=3"], ["'unlearn.lora' is a section", "unlearn.lora.rank"]),
    ("list-given-a-scalar", ["tracking.backends=wandb"], ["tracking.backends", "[a,b]"]),
    ("lora-negative-rank", ["unlearn.lora.rank=-1"], ["unlearn.lora.rank"]),
    ("unknown-tracker", ["tracking.backends=[foo]"], ["unknown tracker", "tensorboard"]),
    ("oracle-not-a-bool", ["train.oracle=maybe"], ["train.oracle", "bool"]),
    ("canary-without-secret", ["data.canary_secret_length=1", "data.canary_alphabet=ab"], ["secret"]),
    ("canary-empty-prefix", ["data.canary_prefix=' '"], ["prefix"]),
    ("override-without-equals", ["train.steps"], ["key=value"]),
    ("world-size-disagrees", ["run.num_processes=2"], ["run.num_processes=2", "1 process"]),
    ("unknown-corpus", ["data.corpus=not a corpus!"], ["Unknown corpus", "kjv"]),
    ("missing-corpus-file", ["data.corpus={tmp}/nope.jsonl"], ["does not exist"]),
    ("empty-corpus", ["data.corpus={tmp}/empty.jsonl"], ["empty"]),
    ("malformed-jsonl", ["data.corpus={tmp}/malformed.jsonl"], ["line 4", "JSON"]),
    ("missing-text-field", ["data.corpus={tmp}/missing_field.jsonl"], ["text_field"]),
    ("unsupported-extension", ["data.corpus={tmp}/corpus.xml"], [".xml", "Supported"]),
    ("corpus-too-small", ["data.corpus={tmp}/small.jsonl", "data.min_chars=10"], ["too small", "Lower"]),
    ("missing-model-path", ["model.name_or_path={tmp}/no_model"], ["model.name_or_path", "no_model"]),
    ("key-through-a-list", ["data.kinds.x=3"], ["data.kinds.x=3", "structure"]),
    ("unresolved-interpolation", ["train.steps=${nope}"], ["cannot be resolved", "nope"]),
    ("self-interpolation", ["run.name=${run.name}"], ["cannot be resolved"]),
    ("multi-line-library-message", ["unlearn.max_grad_norm=[[],[1]]"], ["unlearn.max_grad_norm"]),
    ("corpus-not-utf8", ["data.corpus={tmp}/latin1.jsonl"], ["not UTF-8", "latin1.jsonl"]),
    ("option-like-override", ["-x=1"], ["unrecognized arguments", "--help"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_prepare_rejects(capsys, corpora, argv, words):
    run_dir = corpora / "run"
    args = [a.replace("{tmp}", str(corpora)) for a in argv]
    code, err = run_cli(capsys, "prepare", "--preset", "smoke", f"run.dir={run_dir}", *args)
    assert code == 2, err
    assert err.startswith("unlearnbench: error: ") and "Traceback" not in err
    assert err.count("\n") == 1, "one paragraph"
    for w in words:
        assert w in err, (w, err)
    assert not (run_dir / "data").exists() and not (run_dir / "stages").exists()


@pytest.mark.parametrize("argv, words", [
    (["--preset", "nope"], ["Unknown preset", "smoke"]),
    (["--config", "{tmp}/missing.yaml"], ["does not exist"]),
    (["--config", "{tmp}/bad.yaml"], ["not valid YAML"]),
    (["--config", "{tmp}/unknown.yaml"], ["train.stepz"]),
    (["--config", "{tmp}/list.yaml"], ["mapping"]),
    (["--config", "{tmp}/through_list.yaml"], ["through_list.yaml", "structure"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
], ids=["preset", "config-missing", "config-yaml", "config-key", "config-list", "config-through-list", "bad-option"])
def test_config_sources_rejected(capsys, corpora, argv, words):
    code, err = run_cli(capsys, "config", *[a.replace("{tmp}", str(corpora)) for a in argv])
    assert code == 2 and "Traceback" not in err and err.startswith("unlearnbench: error: ")
    assert err.count("\n") == 1, "one paragraph"
    for w in words:
        assert w in err


def test_stage_before_its_inputs(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--preset", "smoke", f"run.dir={tmp_path / 'r'}")
    assert code == 2 and "prepare" in err and "has not run" in err
    assert not (tmp_path / "r" / "models").exists()


def test_run_dir_of_another_config_is_refused(capsys, prepared, tmp_path):
    run = tmp_path / "other"
    shutil.copytree(prepared[1], run)
    before = files_in(run)
    code, err = run_cli(capsys, "prepare", "--preset", "smoke", f"run.dir={run}", "run.seed=5")
    assert code == 2 and "different config" in err and "--force" in err
    assert files_in(run) == before
    main(["prepare", "--preset", "smoke", f"run.dir={run}"])  # the same config: skipped, no error
    assert "already done" in capsys.readouterr().out
