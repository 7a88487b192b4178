"""Pure numpy metrics for unlearnbench: exposure, unlearning quality, utility, memorization.

Every function takes arrays of per-example numbers already computed by the scoring code; none
touches torch, files or processes. The definitions are in docs/definitions.md.
"""
from .exposure import (
    EXPOSURE_KINDS,
    SkewNormFit,
    exposure,
    extrapolated_exposure,
    fit_skewnorm,
    leave_one_out_exposure,
    rank_exposure,
    skewnorm_logcdf,
)
from .memorization import (
    counterfactual_difficulty,
    counterfactual_memorization,
    difficulty,
    exposure_memorization,
    memorization,
)
from .quality import (
    UQResult,
    bootstrap_ci,
    first_crossing,
    forget_quality_ks,
    forgotten,
    steps_to_forget,
    unlearning_quality,
    uq_example,
    uq_with_ci,
)
from .crossing import UQ_TARGETS, interpolated_crossing, uq_auc, value_at_step
from . import contrast
from .stats import mean_ci, spearman_with_ci
from .survival import kaplan_meier, logrank, median_survival, stratified_cox
from .utility import mean_nll, perplexity, token_accuracy, utility_drop

__all__ = [
    "UQ_TARGETS",
    "EXPOSURE_KINDS", "SkewNormFit", "exposure", "extrapolated_exposure", "fit_skewnorm", "leave_one_out_exposure",
    "rank_exposure", "skewnorm_logcdf",
    "counterfactual_difficulty", "counterfactual_memorization", "difficulty",
    "exposure_memorization", "memorization",
    "UQResult", "bootstrap_ci", "first_crossing", "forget_quality_ks", "forgotten",
    "steps_to_forget", "unlearning_quality", "uq_example", "uq_with_ci",
    "mean_ci", "spearman_with_ci",
    "interpolated_crossing", "uq_auc", "value_at_step",
    "contrast",
    "kaplan_meier", "logrank", "median_survival", "stratified_cox",
    "mean_nll", "perplexity", "token_accuracy", "utility_drop",
]
