"""The config's semantic checks (what its types cannot say) and its one normalisation step.

`validate(cfg)` only reads the config it checks and raises a one-paragraph `UserError` naming the key and the fix;
`normalize(cfg)` returns a new config with the deprecated `tracking.backend` folded in. `config.load_config` runs
both; the keys and their meaning are in the README's config reference and docs/definitions.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from unlearnbench.config_schema import list_items
from unlearnbench.errors import UserError

KINDS = ("id", "canary", "domain")
CHOICES = {
    "model.arch": ("llama", "gpt2"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "metrics.exposure": ("extrapolated", "rank"),
    "metrics.loss": ("nll", "nll_sum"),
    "unlearn.requests": ("groups", "per_example", "ids"),
    "unlearn.optimizer": ("adamw", "adam", "sgd"),
    "unlearn.scheduler": ("constant", "linear", "cosine"),
    "unlearn.eval_schedule": ("log", "every"),
    "train.parallel": ("auto", "jobs", "data"),
    "unlearn.parallel": ("auto", "jobs", "data"),
    "attack.requests": ("all", "max_repetitions"),
}
# Values renamed in 0.2.0 (README, Changelog): (key, old value) -> the new value, refused with the new name.
RENAMED_CHOICES = {("train.parallel", "models"): "jobs", ("unlearn.parallel", "requests"): "jobs"}
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


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg) -> None:
    """Semantic checks the type system cannot express; reads `cfg` and never changes it."""
    _check_tables(cfg)
    _check_data(cfg)
    _check_unlearn(cfg)
    _check_rest(cfg)


def normalize(cfg):
    """A copy of `cfg` with the deprecated `tracking.backend` folded into `tracking.backends` (which wins: it is what
    older files set) and duplicate backends dropped; `cfg` itself is left as it was."""
    t = cfg.tracking
    backends = ([] if t.backend == "none" else [t.backend]) if t.backend is not None else t.backends
    tracking = dataclasses.replace(t, backends=list(dict.fromkeys(backends)), backend=None)
    return dataclasses.replace(cfg, tracking=tracking)


def _check_tables(cfg) -> None:
    """The per-key rules: list item types, choices, positive and non-negative numbers."""
    # OmegaConf lets a nested list through a List[int] (`data.repetitions=[[]]`): check the items
    for key, kind in list_items(type(cfg)).items():
        bad = [x for x in _get(cfg, key) if not isinstance(x, kind) or isinstance(x, bool)]
        if bad:
            what = {int: "integers", str: "strings", float: "numbers"}[kind]
            raise UserError(f"'{key}' must be a flat list of {what}; {bad[0]!r} is not one. Write it as "
                            f"{key}=[...] with {what} inside, e.g. {key}={'[1,4,16]' if kind is int else '[a,b]'}.")
    for key, allowed in CHOICES.items():
        val = _get(cfg, key)
        if (key, val) in RENAMED_CHOICES:
            new = RENAMED_CHOICES[(key, val)]
            raise UserError(f"{key}={val} is the name unlearnbench used before 0.2.0 for job-parallel work (each "
                            f"process runs whole jobs, a model to train or a request to unlearn, on its own model "
                            f"copy); it is now {key}={new}. Set {key}={new} (or auto, or data) in your config or "
                            "overrides; the README's Changelog lists every rename.")
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


def _check_data(cfg) -> None:
    """The data section: kinds, repetitions, the canary secret space, sizes that must fit each other."""
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


def _check_unlearn(cfg) -> None:
    """The unlearn section: evaluation samples and schedule, which requests, LoRA."""
    for key in ("eval_references", "eval_utility"):
        if 0 < getattr(cfg.unlearn, key) < 32:
            raise UserError(f"unlearn.{key}={getattr(cfg.unlearn, key)} is too small a sample for stable exposure and "
                            f"utility estimates at each evaluation. Use at least 32, or 0 for every example.")
    if cfg.unlearn.eval_schedule == "every" and cfg.unlearn.eval_every > cfg.unlearn.max_steps:
        raise UserError(f"unlearn.eval_every={cfg.unlearn.eval_every} exceeds unlearn.max_steps="
                        f"{cfg.unlearn.max_steps}: no evaluation would happen after step 0. Lower eval_every.")
    if cfg.unlearn.requests == "ids" and not cfg.unlearn.example_ids:
        raise UserError("unlearn.requests=ids needs unlearn.example_ids=[...] (the example_id values to forget).")
    bad = [k for k in cfg.unlearn.request_kinds if k not in cfg.data.kinds]
    if bad:
        raise UserError(f"unlearn.request_kinds has {bad}, not among data.kinds={cfg.data.kinds}.")
    _check_lora(cfg.unlearn.lora)


def _check_lora(lo) -> None:
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


def _check_rest(cfg) -> None:
    """Attacks, metrics, trackers and batch sizes."""
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
    bad = [b for b in cfg.tracking.backends if b not in TRACKERS]
    if bad:
        raise UserError(f"tracking.backends has unknown tracker(s) {', '.join(map(repr, bad))}. Supported "
                        f"(Accelerate's trackers): {', '.join(TRACKERS)}; e.g. tracking.backends=[wandb,tensorboard], "
                        "or [] for metrics.jsonl only.")
    if cfg.score.batch_tokens is not None and cfg.score.batch_tokens < 0:
        raise UserError(f"score.batch_tokens={cfg.score.batch_tokens}: the token budget per forward must be a positive "
                        "number of tokens, 0 (no budget: batches of score.batch_size examples) or null (automatic).")
    if cfg.train.micro_batch_size is not None and cfg.train.micro_batch_size <= 0:
        raise UserError("train.micro_batch_size must be a positive integer or null.")
