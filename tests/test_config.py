"""Config validation: presets load, unknown keys and wrong types are rejected with the key named."""

import pytest

from unlearnbench.config import config_reference, load_config, preset_names
from unlearnbench.records import stage_fingerprint as fingerprint
from unlearnbench.errors import UserError


def test_presets_load_and_differ():
    assert set(preset_names()) >= {"smoke", "default", "paper"}
    smoke, default, paper = (load_config(p) for p in ("smoke", "default", "paper"))
    assert smoke.model.n_layers == 2 and default.model.n_layers == 4
    assert default.data.repetitions == [1, 4, 16]
    assert paper.data.repetitions == [1, 10, 100] and paper.data.n_references == 10000
    assert paper.model.name_or_path


def test_overrides_are_typed():
    cfg = load_config("smoke", None, ["train.steps=7", "unlearn.lr=0.5", "data.repetitions=[2,3]"])
    assert cfg.train.steps == 7 and cfg.unlearn.lr == 0.5 and cfg.data.repetitions == [2, 3]


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["train.stepz", "steps"]),
    ("nosuchsection.x=1", ["nosuchsection"]),
    ("train.steps=abc", ["train.steps", "int"]),
    ("train.steps=0", ["train.steps", "positive"]),
    ("data.group_size=-4", ["data.group_size"]),
    ("unlearn.method=magic", ["magic", "ga", "npo"]),
    ("metrics.exposure=median", ["metrics.exposure", "extrapolated", "rank"]),
    ("data.kinds=[id,weird]", ["data.kinds"]),
    ("data.repetitions=[0]", ["data.repetitions"]),
    ("data.repetitions=[[]]", ["data.repetitions", "flat list of integers"]),  # found by test_fuzz
    ("run.seeds=[0,[1]]", ["run.seeds", "integers"]),
    ("data.kinds=[id,[canary]]", ["data.kinds", "strings"]),
    ("score.batch_tokens=-1", ["score.batch_tokens", "null"]),
    ("score.batch_tokens=0", []),  # no token budget: batches of score.batch_size examples
    ("unlearn.eval_schedule=every", []),  # valid on its own
])
def test_bad_values_name_the_key(override, words):
    from unlearnbench.study import check_config  # the method registry is checked there: config stays plain data

    if not words:
        check_config(load_config("smoke", None, [override]))
        return
    with pytest.raises(UserError) as err:
        check_config(load_config("smoke", None, [override]))
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("key, old", [("train.parallel", "models"), ("unlearn.parallel", "requests")])
def test_a_renamed_parallel_value_is_refused_naming_the_new_one(key, old):
    """0.2.0 renamed the job-parallel value of both keys to `jobs`: the old one is refused in one paragraph that
    names the new value and the changelog; the new one loads."""
    with pytest.raises(UserError) as err:
        load_config("smoke", None, [f"{key}={old}"])
    msg = str(err.value)
    assert f"{key}={old}" in msg and f"Set {key}=jobs" in msg and "Changelog" in msg and "\n" not in msg
    assert getattr(load_config("smoke", None, [f"{key}=jobs"]), key.split(".")[0]).parallel == "jobs"


def test_every_list_key_has_its_item_type_checked():
    from unlearnbench.config import list_items

    items = list_items()
    assert set(items) == {key for key, kind, _ in config_reference() if kind.startswith("List")}
    assert (items["data.repetitions"], items["run.seeds"], items["attack.quant_bits"]) == (int, int, int)
    assert (items["data.kinds"], items["tracking.backends"], items["unlearn.lora.target_modules"]) == (str, str, str)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="Unknown preset 'nope'.*smoke"):
        load_config("nope")
    with pytest.raises(UserError, match="does not exist"):
        load_config("smoke", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config("smoke", str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  nope: 1\n")
    with pytest.raises(UserError, match="train.nope"):
        load_config("smoke", str(unknown))


def test_eval_every_beyond_max_steps_and_canary_without_secret():
    with pytest.raises(UserError, match="eval_every"):
        load_config("smoke", None, ["unlearn.eval_schedule=every", "unlearn.eval_every=50", "unlearn.max_steps=20"])
    with pytest.raises(UserError, match="secret"):
        load_config("smoke", None, ["data.canary_secret_length=1", "data.canary_alphabet=ab"])


def test_fingerprints_track_their_sections():
    a = load_config("smoke")
    b = load_config("smoke", None, ["unlearn.lr=0.01"])
    c = load_config("smoke", None, ["train.steps=3"])
    assert fingerprint(a, "train") == fingerprint(b, "train")
    assert fingerprint(a, "unlearn") != fingerprint(b, "unlearn")
    assert fingerprint(a, "train") != fingerprint(c, "train")
    assert fingerprint(a, "prepare") == fingerprint(c, "prepare")


def test_readme_lists_every_config_key():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key, _, _ in config_reference() if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}; regenerate with `python -m unlearnbench.docs`"


def test_one_schema_walk_serves_keys_types_sections_and_the_reference():
    import dataclasses

    from unlearnbench.config import Config, schema

    s = schema()
    assert s[""].fields == tuple(f.name for f in dataclasses.fields(Config))
    assert s["unlearn.lora"].is_section and s["unlearn.lora"].fields == ("rank", "alpha", "dropout", "target_modules")
    assert (s["train.steps"].type, s["train.steps"].default) == ("int", 1000)
    assert (s["unlearn.grad_clip"].type, s["unlearn.grad_clip"].default) == ("Optional[float]", None)
    assert (s["data.repetitions"].type, s["data.repetitions"].default) == ("List[int]", [1, 4, 16])
    ref = config_reference()
    assert [k for k, _, _ in ref] == [k for k, e in s.items() if not e.is_section and k != "preset"]
    assert ("unlearn.lora.rank", "int", "0") in ref and ("data.corpus", "str", '"kjv"') in ref
    assert len(ref) == len({k for k, _, _ in ref})


def test_validate_does_not_change_its_input_and_normalize_returns_a_new_config():
    import copy

    from unlearnbench.config import Config, TrackingConfig, normalize, validate

    raw = Config(tracking=TrackingConfig(backends=["tensorboard", "tensorboard"], backend="wandb"), preset="x")
    before = copy.deepcopy(raw)
    validate(raw)
    assert raw == before  # a check only reads
    out = normalize(raw)
    assert raw == before and out is not raw and out.tracking is not raw.tracking
    assert (out.tracking.backends, out.tracking.backend) == (["wandb"], None)  # the deprecated key wins
    assert normalize(Config(tracking=TrackingConfig(backend="none"), preset="x")).tracking.backends == []
    dup = Config(tracking=TrackingConfig(backends=["tensorboard", "wandb", "tensorboard"]), preset="x")
    assert normalize(dup).tracking.backends == ["tensorboard", "wandb"] and dup.tracking.backends[2] == "tensorboard"
    assert normalize(out) == out  # once normalised, it stays
    assert load_config("smoke", None, ["tracking.backend=none"]).tracking.backends == []
