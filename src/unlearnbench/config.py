"""Typed, validated configuration: dataclasses merged by OmegaConf from preset, file and overrides."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from unlearnbench.errors import UserError

BUILTIN_CORPORA = ("kjv", "pydoc")
KINDS = ("id", "canary", "domain")


@dataclass
class DataConfig:
    """What `prepare` builds: the ID corpus, the OOD forget sets, references, holdouts."""

    corpus: str = "kjv"  # kjv | pydoc | local .jsonl/.json/.parquet/.txt/.csv | a `datasets` hub name
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
    parallel: str = "auto"  # auto | models | data: how several processes share the models to train (README)
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
    max_grad_norm: float = 1.0e6  # a larger (or non-finite) gradient norm counts as divergence
    save_model: bool = False  # the final unlearned model, as safetensors
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA unlearning (unlearn.lora.*; off by default)
    save_unlearned: bool = True  # the model at the step the request became unlearned (the attacks start there)
    parallel: str = "auto"  # auto | data | requests: how several processes share the requests (README)


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


CHOICES = {
    "model.arch": ("llama", "gpt2"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "metrics.exposure": ("extrapolated", "rank"),
    "metrics.loss": ("nll", "nll_sum"),
    "unlearn.requests": ("groups", "per_example", "ids"),
    "unlearn.optimizer": ("adamw", "adam", "sgd"),
    "unlearn.scheduler": ("constant", "linear", "cosine"),
    "unlearn.eval_schedule": ("log", "every"),
    "train.parallel": ("auto", "models", "data"),
    "unlearn.parallel": ("auto", "data", "requests"),
    "attack.requests": ("all", "max_repetitions"),
}
OPTIONAL_CHOICES = {"tracking.mode": ("online", "offline", "disabled"), "tracking.backend": ("wandb", "none")}
# The trackers Accelerate knows by name (accelerate.tracking.LOGGER_TYPE_TO_CLASS) and the pip package of each.
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet-ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
POSITIVE_INTS = (
    "data.group_size", "data.replicates", "data.n_train", "data.n_holdout", "data.n_id_references", "data.n_references",
    "data.n_domain_references", "data.n_domain_holdout", "data.n_retain", "data.max_tokens",
    "data.canary_secret_length", "data.vocab_size", "model.n_layers", "model.hidden_size",
    "model.n_heads", "model.intermediate_size", "model.max_position_embeddings", "train.steps",
    "train.batch_size", "train.checkpoint_every", "train.log_every", "score.batch_size",
    "unlearn.max_steps", "unlearn.batch_size", "unlearn.retain_batch_size", "unlearn.eval_every",
    "unlearn.patience", "metrics.n_boot", "attack.relearn_steps", "attack.relearn_batch_size",
)
POSITIVE_FLOATS = ("train.lr", "unlearn.lr", "attack.relearn_lr", "metrics.max_ppl_ratio", "unlearn.simnpo_beta", "unlearn.beta")
NON_NEGATIVE = (
    "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.min_lr_ratio",
    "unlearn.warmup_steps", "unlearn.weight_decay", "unlearn.retain_weight", "data.min_chars",
    "score.shadow_models", "train.keep_checkpoints", "metrics.tolerance_bits", "metrics.uq_min_gap_bits",
    "unlearn.max_per_example_requests", "unlearn.eval_references", "unlearn.eval_utility",
)


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("unlearnbench.presets").iterdir() if p.name.endswith(".yaml"))


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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


def _allowed_keys(section: str) -> list[str]:
    cls: Any = Config
    if section:
        for part in section.split("."):
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if part not in fields:
                return [f.name for f in dataclasses.fields(Config)]
            cls = fields[part].default_factory  # type: ignore[assignment]
    return [f.name for f in dataclasses.fields(cls)]


def _section_fields(key: str) -> list[str] | None:
    """The field names of the config section at `key`, or None when `key` is not a section."""
    cls: Any = Config
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        factory = getattr(fields.get(part), "default_factory", None)
        if part not in fields or not dataclasses.is_dataclass(factory):
            return None
        cls = factory
    return [f.name for f in dataclasses.fields(cls)]


def _expected_type(key: str) -> str:
    parts = key.split(".")
    cls: Any = Config
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return "a value of the declared type"
        f = fields[part]
        if dataclasses.is_dataclass(getattr(f, "default_factory", None)):
            cls = f.default_factory
        else:
            return str(f.type).replace("typing.", "")
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
    return obj


@functools.lru_cache(maxsize=None)
def list_items() -> dict[str, type]:
    """Every list key and the type of its items, from the dataclasses' annotations (List[int] -> int)."""
    kinds = {"int": int, "str": str, "float": float}
    return {key: kinds[typ[5:-1]] for key, typ, _ in config_reference() if typ.startswith("List[")}


def validate(cfg: Config) -> None:
    """Semantic checks the type system cannot express."""
    # OmegaConf lets a nested list through a List[int] (`data.repetitions=[[]]`): check the items
    for key, kind in list_items().items():
        bad = [x for x in _get(cfg, key) if not isinstance(x, kind) or isinstance(x, bool)]
        if bad:
            what = {int: "integers", str: "strings", float: "numbers"}[kind]
            raise UserError(f"'{key}' must be a flat list of {what}; {bad[0]!r} is not one. Write it as "
                            f"{key}=[...] with {what} inside, e.g. {key}={'[1,4,16]' if kind is int else '[a,b]'}.")
    for key, allowed in CHOICES.items():
        val = _get(cfg, key)
        if val not in allowed:
            raise UserError(f"Invalid value '{val}' for '{key}'. Allowed: {', '.join(allowed)}.")
    for key, allowed in OPTIONAL_CHOICES.items():
        val = _get(cfg, key)
        if val is not None and val not in allowed:
            raise UserError(f"Invalid value '{val}' for '{key}'. Allowed: {', '.join(allowed)} (or null).")
    for key in POSITIVE_INTS:
        if _get(cfg, key) <= 0:
            raise UserError(f"'{key}' must be a positive integer, got {_get(cfg, key)}. Set {key}=<n> with n >= 1.")
    for key in POSITIVE_FLOATS:
        if not _get(cfg, key) > 0:
            raise UserError(f"'{key}' must be > 0, got {_get(cfg, key)}.")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise UserError(f"'{key}' must be >= 0, got {_get(cfg, key)}.")
    d = cfg.data
    bad = [k for k in d.kinds if k not in KINDS]
    if bad or not d.kinds or len(set(d.kinds)) != len(d.kinds):
        raise UserError(f"data.kinds={d.kinds} is invalid: give distinct kinds from {', '.join(KINDS)}.")
    if not d.repetitions or any(r < 1 for r in d.repetitions) or len(set(d.repetitions)) != len(d.repetitions):
        raise UserError(f"data.repetitions={d.repetitions} is invalid: give distinct integers >= 1, e.g. [1,4,16].")
    if "canary" in d.kinds:
        if not d.canary_alphabet or len(set(d.canary_alphabet)) < 2:
            raise UserError("data.canary_alphabet must hold at least 2 distinct characters for the secret.")
        if d.canary_prefix.strip() == "":
            raise UserError("data.canary_prefix is empty: canaries need a fixed prefix before the secret "
                            "(e.g. 'My secret is ').")
        symbols = len(set(d.canary_alphabet))
        needed = 4 * (d.n_references + d.group_size * len(d.repetitions) * d.replicates)
        # in logs: symbols ** length of a huge length would never finish computing
        if d.canary_secret_length * math.log(symbols) < math.log(needed):
            raise UserError(f"data.canary_secret_length={d.canary_secret_length} with {symbols} symbols allows only "
                            f"{symbols ** d.canary_secret_length} secrets, too few for {d.n_references} references "
                            "plus the canaries. Lengthen the secret.")
    if d.n_retain > d.n_train:
        raise UserError(f"data.n_retain={d.n_retain} exceeds data.n_train={d.n_train}: the retain sample is drawn "
                        "from the train pool. Lower data.n_retain.")
    if d.max_tokens + 1 > cfg.model.max_position_embeddings and cfg.model.name_or_path is None:
        raise UserError(f"data.max_tokens={d.max_tokens} does not fit model.max_position_embeddings="
                        f"{cfg.model.max_position_embeddings}. Raise the latter or lower the former.")
    m = cfg.model
    if m.name_or_path is None and m.hidden_size % m.n_heads:
        raise UserError(f"model.hidden_size={m.hidden_size} is not divisible by model.n_heads={m.n_heads}.")
    for key in ("eval_references", "eval_utility"):
        if 0 < getattr(cfg.unlearn, key) < 32:
            raise UserError(f"unlearn.{key}={getattr(cfg.unlearn, key)} is too small a sample for stable exposure and "
                            f"utility estimates at each evaluation. Use at least 32, or 0 for every example.")
    if cfg.unlearn.eval_schedule == "every" and cfg.unlearn.eval_every > cfg.unlearn.max_steps:
        raise UserError(f"unlearn.eval_every={cfg.unlearn.eval_every} exceeds unlearn.max_steps="
                        f"{cfg.unlearn.max_steps}: no evaluation would happen after step 0. Lower eval_every.")
    if cfg.unlearn.requests == "ids" and not cfg.unlearn.example_ids:
        raise UserError("unlearn.requests=ids needs unlearn.example_ids=[...] (the example_id values to forget).")
    bad = [k for k in cfg.unlearn.request_kinds if k not in d.kinds]
    if bad:
        raise UserError(f"unlearn.request_kinds has {bad}, not among data.kinds={d.kinds}.")
    _validate_lora(cfg.unlearn.lora)
    if not 0 < cfg.attack.relearn_forget_fraction < 1:
        raise UserError(f"attack.relearn_forget_fraction must lie strictly between 0 and 1 (some examples trained on, "
                        f"some held out), got {cfg.attack.relearn_forget_fraction}.")
    if not 0 < cfg.attack.mia_k <= 1:
        raise UserError(f"attack.mia_k must lie in (0, 1], got {cfg.attack.mia_k}.")
    if any(b not in (4, 8) for b in cfg.attack.quant_bits):
        raise UserError(f"attack.quant_bits={cfg.attack.quant_bits}: weight-only quantization supports 8 and 4 bits.")
    if not 0 < cfg.metrics.alpha < 1:
        raise UserError(f"metrics.alpha must lie in (0, 1) (0.05 gives 95% intervals), got {cfg.metrics.alpha}.")
    if not 0 < cfg.metrics.uq_target <= 1:
        raise UserError(f"metrics.uq_target must lie in (0, 1], got {cfg.metrics.uq_target}.")
    t = cfg.tracking
    bad = [b for b in t.backends if b not in TRACKERS]
    if bad:
        raise UserError(f"tracking.backends has unknown tracker(s) {', '.join(map(repr, bad))}. Supported "
                        f"(Accelerate's trackers): {', '.join(TRACKERS)}; e.g. tracking.backends=[wandb,tensorboard], "
                        "or [] for metrics.jsonl only.")
    if t.backend is not None:  # the deprecated single-backend key wins over the list: it is what older files set
        t.backends, t.backend = ([] if t.backend == "none" else [t.backend]), None
    t.backends = list(dict.fromkeys(t.backends))
    if cfg.score.batch_tokens is not None and cfg.score.batch_tokens < 0:
        raise UserError(f"score.batch_tokens={cfg.score.batch_tokens}: the token budget per forward must be a positive "
                        "number of tokens, 0 (no budget: batches of score.batch_size examples) or null (automatic).")
    if cfg.train.micro_batch_size is not None and cfg.train.micro_batch_size <= 0:
        raise UserError("train.micro_batch_size must be a positive integer or null.")


def _validate_lora(lo: LoraConfig) -> None:
    if lo.rank < 0:
        raise UserError(f"unlearn.lora.rank must be >= 0 (0 turns LoRA off), got {lo.rank}. Try unlearn.lora.rank=8.")
    if not lo.rank:
        return
    if not (math.isfinite(lo.alpha) and lo.alpha > 0):
        raise UserError(f"unlearn.lora.alpha must be a positive number (the update is scaled by alpha / rank), got "
                        f"{lo.alpha}. Try unlearn.lora.alpha={2 * lo.rank}.")
    if not 0 <= lo.dropout < 1:
        raise UserError(f"unlearn.lora.dropout must lie in [0, 1), got {lo.dropout}.")
    names = [str(t) for t in lo.target_modules]
    if not names or any(not t.strip() for t in names):
        raise UserError(f"unlearn.lora.target_modules={lo.target_modules} must name the modules to adapt, e.g. "
                        "[all-linear] or [q_proj,k_proj,v_proj,o_proj] (Llama) or [c_attn,c_proj,c_fc] (GPT-2).")
    if "all-linear" in names and len(names) > 1:
        raise UserError(f"unlearn.lora.target_modules={lo.target_modules}: all-linear already adapts every linear "
                        "layer; give it alone or list module names without it.")


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
    rows = []
    for sec in dataclasses.fields(Config):
        if sec.name == "preset":
            continue
        rows += _reference_rows(sec.name, sec.default_factory)  # type: ignore[arg-type]
    return rows


def _reference_rows(prefix: str, cls: Any) -> list[tuple[str, str, str]]:
    """Rows of one section, nested sections (unlearn.lora) flattened to dotted keys."""
    rows, inst = [], cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(getattr(f, "default_factory", None)):
            rows += _reference_rows(f"{prefix}.{f.name}", f.default_factory)
            continue
        typ = str(f.type).replace("typing.", "")
        rows.append((f"{prefix}.{f.name}", typ, json.dumps(getattr(inst, f.name))))
    return rows
