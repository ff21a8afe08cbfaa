"""The report's metric registry: each final metric's name, unit, meaning and direction
(lower or higher is better), and the groups of metrics the report summarizes, compares
and shows per run.

    metric("val_loss").label        # "final val loss, estimate"
    improves("val_loss", -0.02)     # True: a loss is better lower
"""

from __future__ import annotations

from dataclasses import dataclass

from gradnoise.study.tasks import HIGHER, LOWER, MNIST

LOSS_UNIT = "nats/char"
BPC_UNIT = "bits/char"


@dataclass(frozen=True)
class Metric:
    """A final metric as the report names it; `better` says which way is better ("lower" for
    a loss, "higher" for an accuracy: `tasks.Task.metrics`)."""

    key: str
    label: str
    unit: str
    meaning: str = ""
    better: str = LOWER


METRICS = {
    metric.key: metric
    for metric in (
        Metric(
            "val_loss_full",
            "final val loss, full pass",
            LOSS_UNIT,
            "exact: one pass over the whole val split at the end",
        ),
        Metric("best_val_loss", "best val loss", LOSS_UNIT, "the lowest of the periodic estimates"),
        Metric("val_loss", "final val loss, estimate", LOSS_UNIT, "the last eval, eval_iters batches"),
        Metric("train_loss", "final train loss, eval mode", LOSS_UNIT, "the last eval, eval_iters batches"),
        Metric(
            "train_loss_window",
            "train loss, last log window",
            LOSS_UNIT,
            "train mode (dropout on): the mean of the last log_interval minibatches' losses",
        ),
        Metric(
            "train_loss_last_batch",
            "train loss, last minibatch",
            LOSS_UNIT,
            "train mode (dropout on): the last step's minibatch alone",
        ),
        Metric("test_loss_full", "test loss, full pass", LOSS_UNIT, "one pass over the whole split"),
        Metric("val_bpc_full", "final val BPC, full pass", BPC_UNIT, "one pass over the whole split"),
        Metric("best_val_bpc", "best val BPC", BPC_UNIT, "the lowest eval"),
        Metric("val_bpc", "final val BPC, estimate", BPC_UNIT, "the last eval"),
        Metric("train_bpc", "train BPC, eval mode", BPC_UNIT, "the last eval, in eval mode"),
        Metric("test_bpc_full", "test BPC, full pass", BPC_UNIT, "one pass over the whole split"),
        Metric("best_val_step", "step of the best val loss", "steps"),
        Metric("step_time_median_s", "median step time (s)", "s"),
        Metric("tokens_per_s", "tokens/s", "tokens/s"),
        Metric("train_s", "training time (s)", "s"),
    )
}
#: The final val loss first: exact where the runs made the full pass (see `headline_metric`).
LOSS_METRICS = (
    "val_loss_full",
    "best_val_loss",
    "val_loss",
    "train_loss",
    "train_loss_window",
    "train_loss_last_batch",
    "test_loss_full",
)
BPC_METRICS = ("val_bpc_full", "best_val_bpc", "val_bpc", "train_bpc", "test_bpc_full")
COST_METRICS = ("step_time_median_s", "tokens_per_s", "train_s")
#: Summarized per dataset × method (and written to summary.csv).
SUMMARY_METRICS = LOSS_METRICS + BPC_METRICS + COST_METRICS
#: Compared with the baseline; each metric of each dataset is one Holm family.
COMPARED_METRICS = ("val_loss_full", "best_val_loss", "val_loss", "train_loss", "test_loss_full")
#: A published value measured as the first is also set beside our second: the same
#: quantity (train mode, end of training) averaged over a log window's minibatches.
LIKE_FOR_LIKE = {"train_loss_last_batch": "train_loss_window"}
#: Shown per run (the per-run table and runs.csv).
RUN_METRICS = (
    "val_loss_full",
    "best_val_loss",
    "best_val_step",
    "val_loss",
    "train_loss",
    "train_loss_window",
    "train_loss_last_batch",
    "test_loss_full",
    "final_sigma",
)


def metric(key: str) -> Metric:
    """The report's name for a final metric (the key itself for those it has no words for),
    with its direction (a metric some task calls higher-is-better is so here too)."""
    return METRICS.get(key) or Metric(key, key, "", better=MNIST.better(key))


def improvement_sign(key: str) -> int:
    """−1 where a lower value is better (a loss: Δ < 0 helps), +1 where a higher one is."""
    return 1 if metric(key).better == HIGHER else -1


def improves(key: str, difference: float) -> bool:
    """Whether a difference (method − control) in `key` is in the better direction."""
    return improvement_sign(key) * difference > 0
