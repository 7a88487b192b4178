"""Typed, validated configuration: dataclasses merged by OmegaConf from preset, file and overrides.

The dataclasses below are the schema (`config_schema.walk` reads them once for keys, types, sections and the
README's config reference); the semantic checks and the one normalisation step live in `config_checks`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from unlearnbench import config_schema
from unlearnbench.config_checks import KINDS, TRACKERS, normalize, validate  # noqa: F401 (the config's public face)
from unlearnbench.errors import UserError


@dataclass
class DataConfig:
    """What `prepare` builds: the ID corpus, the OOD forget sets, references, holdouts."""

    corpus: str = "kjv"  # kjv | pydoc | pystdlib | local .jsonl/.json/.parquet/.txt/.csv | a `datasets` hub name
    corpus_config: Optional[str] = None  # `datasets` configuration name for a hub corpus
    corpus_split: str = "train"
    text_field: str = "text"
    domain_corpus: str = "pydoc"  # the OOD `domain` kind; same choices as `corpus`
    kinds: List[str] = field(default_factory=lambda: ["id", "canary", "domain"])
    repetitions: List[int] = field(default_factory=lambda: [1, 4, 16])
    group_size: int = 32  # forget examples per forget group (one unlearning request)
    replicates: int = 1  # disjoint forget groups per (kind, repetitions): the replicates of the findings
    n_train: int = 4000  # ID passages in the train pool (both models train on them)
    n_holdout: int = 300  # ID holdout for utility (never trained on, disjoint from references)
    n_id_references: int = 500  # ID reference set for exposure (never trained on)
    n_references: int = 1000  # canary reference secrets (never trained on)
    n_domain_references: int = 300
    n_domain_holdout: int = 100
    n_retain: int = 200  # fixed sample of the train pool: utility and retain losses
    min_chars: int = 40
    max_tokens: int = 128  # examples are truncated to this many tokens (after BOS)
    canary_prefix: str = "My secret is "
    canary_secret_length: int = 10
    canary_alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab_size: int = 4096  # byte-level BPE trained on the training mixture (models from config)


@dataclass
class ModelConfig:
    """A tiny model from config (random init) or any causal LM by `name_or_path` (fine-tuned)."""

    name_or_path: Optional[str] = None
    arch: str = "llama"  # llama | gpt2, for models from config
    n_layers: int = 4
    hidden_size: int = 128
    n_heads: int = 4
    intermediate_size: int = 344
    tie_embeddings: bool = True
    max_position_embeddings: int = 256
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    """The recipe shared by `original`, `oracle` and shadow models."""

    steps: int = 1000
    batch_size: int = 32  # effective (global) batch in examples, whatever the process count
    micro_batch_size: Optional[int] = None  # per device; default batch_size / processes
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    grad_clip: float = 1.0
    length_grouping: bool = True  # batches of similar length: ~3.5x faster on mixed lengths
    checkpoint_every: int = 200
    keep_checkpoints: int = 0  # checkpoints kept once the model is saved and verified (0: none; N: the newest N)
    log_every: int = 50
    parallel: str = "auto"  # auto | jobs | data: how several processes share the models to train (README)
    oracle: bool = True  # train the oracle θᵣ; false = no-oracle mode: e_r from θ₀'s held-out references of the kind, leave-one-out (docs/definitions.md §11)


@dataclass
class ScoreConfig:
    """The sharded scoring passes of the score stage (and the in-loop evaluations)."""

    batch_size: int = 64  # examples per device per forward, at most
    batch_tokens: Optional[int] = None  # padded tokens per forward, at most (null: 2^22 / vocab on CPU, 2^28 / vocab on GPU; 0: no cap)
    shadow_models: int = 0  # K > 0 trains K models on random halves: counterfactual memorization


@dataclass
class MetricsConfig:
    """How losses turn into exposure, unlearning quality and the forgotten rule (docs/definitions.md)."""

    exposure: str = "extrapolated"  # extrapolated | rank
    loss: str = "nll"  # nll | nll_sum: the loss score behind exposure
    uq_target: float = 0.9
    tolerance_bits: float = 0.5
    uq_min_gap_bits: float = 1.0
    max_ppl_ratio: float = 1.0e4
    n_boot: int = 200
    alpha: float = 0.05


@dataclass
class LoraConfig:
    """LoRA unlearning (peft): only low-rank adapters are trained; the saved unlearned model is merged."""

    rank: int = 0  # adapter rank r; 0 = off (every weight is trained)
    alpha: float = 16.0  # the adapters' update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input (train mode only)
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])  # module names (suffixes) to adapt, or all-linear: every linear / GPT-2 Conv1D layer but the output layer


@dataclass
class UnlearnConfig:
    """The unlearning loop: method, optimiser, evaluation schedule and stopping rules."""

    method: str = "ga"  # ga | ga_gd | ga_kl | npo | npo_gd | simnpo
    requests: str = "groups"  # groups | per_example | ids
    example_ids: List[str] = field(default_factory=list)  # for requests=ids: one request
    request_kinds: List[str] = field(default_factory=list)  # restrict requests to these kinds
    max_per_example_requests: int = 0  # per_example: cap on requests (0 = all forget examples)
    max_steps: int = 100
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 3.0e-4
    weight_decay: float = 0.0
    scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    batch_size: int = 32  # forget examples per step (capped at the request size)
    retain_batch_size: int = 32
    grad_clip: Optional[float] = None
    beta: float = 0.1  # npo/npo_gd temperature (simnpo uses simnpo_beta)
    simnpo_beta: float = 2.5
    gamma: float = 0.0
    retain_weight: float = 1.0
    nll_clamp: Optional[float] = None
    eval_schedule: str = "log"  # log | every
    eval_every: int = 10  # for eval_schedule=every
    eval_references: int = 0  # references per kind at in-loop evaluations after step 0 (0 = all; >0 a sample; README)
    eval_utility: int = 64  # examples per utility set at in-loop evaluations (0 = all; README)
    patience: int = 1  # the UQ target must hold for this many evaluations
    stop_on_target: bool = True  # stop once the target held (and, with until_all_forgotten, every example is forgotten)
    until_all_forgotten: bool = True  # continue past the target until every example is forgotten (survival view)
    skip_nothing_to_forget: bool = False  # stop a request at step 0 when its gap is under the floor (excluded anyway)
    max_grad_norm: float = 1.0e6  # a larger (or non-finite) gradient norm: the request collapsed
    save_model: bool = False  # the final unlearned model, as safetensors
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA unlearning (unlearn.lora.*; off by default)
    save_unlearned: bool = True  # the model at the step the request became unlearned (the attacks start there)
    parallel: str = "auto"  # auto | jobs | data: how several processes share the requests (README)


@dataclass
class AttackConfig:
    """Does forgetting last: relearning, quantization reload and membership inference after unlearning."""

    enabled: bool = True
    requests: str = "all"  # all | max_repetitions: which unlearned requests are attacked
    relearn_steps: int = 10  # fine-tuning steps of each relearning attack
    relearn_lr: float = 3.0e-4
    relearn_batch_size: int = 8
    relearn_forget_fraction: float = 0.5  # share of the request's examples the targeted relearning trains on
    quant_bits: List[int] = field(default_factory=lambda: [8, 4])  # weight-only quantization reloads
    mia_k: float = 0.2  # the k of Min-K% and Min-K%++ (fraction of the lowest token scores)


@dataclass
class TrackingConfig:
    """Experiment tracking: Accelerate's trackers (W&B by default, offline when no API key) plus local metrics.jsonl."""

    backends: List[str] = field(default_factory=lambda: ["wandb"])  # Accelerate's trackers: wandb, tensorboard, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; [] = metrics.jsonl only
    backend: Optional[str] = None  # deprecated alias: wandb = backends [wandb], none = backends []
    project: str = "unlearnbench"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the run name
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; default offline without an API key


@dataclass
class RunConfig:
    """Where a run lives and which seeds it covers."""

    name: Optional[str] = None  # default: the preset name
    dir: Optional[str] = None  # default: runs/<name>
    seed: int = 0
    seeds: List[int] = field(default_factory=list)  # several seeds: one sub-run each, aggregated
    num_processes: Optional[int] = None  # when set, the launch must have exactly this many
    lock_stale_hours: Optional[float] = None  # a run.lock from another host older than this is stale (default 24)


@dataclass
class Config:
    """The whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = MISSING


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("unlearnbench.presets").iterdir() if p.name.endswith(".yaml"))


def _merge(base: Any, other: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as exc:
        raise UserError(_explain_omegaconf(exc, origin)) from None


def _explain_omegaconf(exc: OmegaConfBaseException, origin: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0].rstrip(".")
    if isinstance(exc, ConfigKeyError) or "not in struct" in msg or "Key '" in msg and "not" in msg:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(section)
        return (f"Unknown config key '{key}' in {origin}. Allowed keys"
                f"{' in ' + section if section else ''}: {', '.join(allowed)}. "
                "Fix the spelling, or see the README's config reference.")
    if key == "?" and origin.startswith("override '") and "=" in origin:
        key = origin[len("override '"):].split("=", 1)[0]  # OmegaConf names no key when a section gets a scalar
    section = _section_fields(key)
    if section is not None:
        return (f"Invalid value in {origin}: '{key}' is a section of the config, not a value. Set its keys one by one, "
                f"e.g. `{key}.{section[0]}=...` (its keys: {', '.join(section)}).")
    expected = _expected_type(key)
    example = f"{key}=[a,b]" if expected.startswith("List") else f"{key}=<{expected}>"
    return (f"Invalid value for config key '{key}' in {origin}: {msg}. "
            f"Expected {expected}. Fix the value, e.g. `{example}`.")


def schema() -> dict[str, config_schema.Entry]:
    """Every section and key of `Config` by dotted key (the root section under ""): one walk over the dataclasses
    that serves the error messages, the list item types and the README's config reference."""
    return config_schema.walk(Config)


def _allowed_keys(section: str) -> list[str]:
    """The keys of the config section `section`; the top-level sections when it is not one."""
    entry = schema().get(section)
    return list((entry if entry is not None and entry.is_section else schema()[""]).fields)


def _section_fields(key: str) -> list[str] | None:
    """The field names of the config section at `key`, or None when `key` is not a section."""
    entry = schema().get(key) if key else None
    return list(entry.fields) if entry is not None and entry.is_section else None


def _expected_type(key: str) -> str:
    """The declared type of the first key on `key`'s path that holds a value (`train.steps.x` -> int)."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        entry = schema().get(".".join(parts[:i]))
        if entry is None:
            break
        if not entry.is_section:
            return entry.type
    return "a value of the declared type"


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] | None = None) -> Config:
    """Resolve preset < config file < key=value overrides into a validated Config."""
    preset = preset or "default"
    names = preset_names()
    if preset not in names:
        raise UserError(f"Unknown preset '{preset}'. Available presets: {', '.join(names)}. "
                        "Pass one of them with --preset NAME.")
    cfg = OmegaConf.structured(Config)
    text = (resources.files("unlearnbench.presets") / f"{preset}.yaml").read_text()
    cfg = _merge(cfg, OmegaConf.create(text), f"preset '{preset}'")
    cfg.preset = preset
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"Config file '{config_file}' does not exist. Pass the path of a YAML file "
                            "with --config FILE.")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml errors carry the line
            raise UserError(f"Config file '{config_file}' is not valid YAML: {exc}. Fix the file.") from None
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise UserError(f"Config file '{config_file}' must hold a mapping of sections (data:, model:, ...).")
        cfg = _merge(cfg, loaded, f"config file '{config_file}'")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"Override '{item}' is not of the form key=value (e.g. train.steps=200).")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise UserError(f"Override '{item}' cannot be parsed: {exc}. Use key=value.") from None
        cfg = _merge(cfg, dot, f"override '{item}'")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return normalize(obj)


def list_items() -> dict[str, type]:
    """Every list key and the type of its items, from the dataclasses' annotations (List[int] -> int)."""
    return config_schema.list_items(Config)


def to_dict(cfg: Config) -> dict:
    """Plain-dict view of a config."""
    return dataclasses.asdict(cfg)


def fingerprint(cfg: Config, sections: tuple[str, ...]) -> str:
    """Hash of the given config sections (dotted keys), e.g. those a stage's outputs depend on."""
    full = to_dict(cfg)
    part = {key: _get_dict(full, key) for key in sections}
    blob = json.dumps(part, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _get_dict(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def config_reference() -> list[tuple[str, str, str]]:
    """(key, type, default) for every config key, for the README's reference table."""
    return [(e.key, e.type, json.dumps(e.default)) for e in config_schema.keys(Config) if e.key != "preset"]
