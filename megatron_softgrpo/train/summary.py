"""The end of a training run: held-out accuracy before and after, and the training curves."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_softgrpo.config.schema import LoggerCfg
from megatron_softgrpo.train.metrics_log import FINAL_VALIDATION, MetricsLog
from megatron_softgrpo.train.plots import TRAINING_CURVES, plot_runs


@dataclass(frozen=True)
class FinalValidation:
    """`final_validation.json`: held-out results after the last step, and before the first (None
    without `grpo.val_at_start`)."""

    step: int
    num_problems: int
    at_start: dict | None  # {"accuracy", "answer_rate", "response_length"}
    final: dict


def summarize_run(
    cfg: LoggerCfg,
    log: MetricsLog,
    step: int,
    num_problems: int,
    first_val: dict | None,
    final: dict | None,
) -> None:
    """final_validation.json and the console line (the accuracy before training read back from
    step 1's line after a resume); the training curves. The main rank only."""
    if final is not None:
        if first_val is None:
            first_val = log.at_start_validation()
        log.write_json(
            FINAL_VALIDATION, asdict(FinalValidation(step, num_problems, first_val, final))
        )
        before = f"{first_val['accuracy']:.3f} -> " if first_val is not None else ""
        print(
            f"[softgrpo] held-out accuracy: {before}{final['accuracy']:.3f} ({num_problems} problems)",
            flush=True,
        )
    out = plot_runs([cfg.log_dir], f"{cfg.log_dir}/{TRAINING_CURVES}")
    print(f"[softgrpo] curves: {out}", flush=True)
