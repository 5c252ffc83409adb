"""Per-step metrics: a progress line, `metrics.jsonl`, TensorBoard, and optional Weights & Biases.

`metrics.jsonl` holds exactly one JSON object per RL step (strict JSON: a value that is not a
finite number, such as the gradient norm of a skipped optimizer step, is written as null), with
the key names documented in the README. On resume the file is cut back to the checkpoint's
step, so an interrupted and resumed run writes exactly the lines an uninterrupted run would.
Run-level results (`final_validation.json`) go to their own files in the same directory.
Only the main rank writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_softgrpo.config.schema import LoggerCfg
from megatron_softgrpo.errors import UserError


# Keys of every metrics.jsonl line (besides "step"); documented in the README. "kl/mean" appears
class Timings(dict):
    """Seconds by metric name; `with timings("time/rollout"):` adds the block's wall time (a
    step with dynamic sampling rolls out and grades several times)."""

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[key] = self.get(key, 0.0) + time.perf_counter() - start


class ProgressLine:
    """A long phase's progress on the console, at most every `every_s` seconds: rows finished of
    `rows`, decode steps of `steps`, and the time left at most (a row stops at its end or at the
    last step)."""

    def __init__(self, name: str, rows: int, steps: int, enabled: bool, every_s: float = 10.0):
        self.name, self.rows, self.steps, self.enabled = name, rows, steps, enabled
        self.every_s = every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, finished: int, step: int) -> None:
        now = time.perf_counter()
        if step == 1:  # the clock starts after the prefill, which is no decode step
            self.start = now
        if not self.enabled or step == 1 or now - self.last < self.every_s:
            return
        self.last = now
        print(self.line(finished, step, now - self.start), flush=True)

    def line(self, finished: int, step: int, elapsed_s: float) -> str:
        left = round(elapsed_s / max(step - 1, 1) * (self.steps - step))
        return (
            f"[softgrpo] {self.name}: {finished}/{self.rows} problems, step {step}/{self.steps}, "
            f"at most {left // 60}:{left % 60:02d} left"
        )


FINAL_VALIDATION = "final_validation.json"  # held-out before -> after, beside metrics.jsonl

# when a reference model is used; validation adds "val/..." and, on step 1, "val_at_start/...".
# "entropy/mean" (not in STEP_KEYS: the mean entropy of the scored positions' sampling distributions,
# from the update's forward passes) appears when loss_fn.entropy_coef > 0. OPTIONAL_KEYS appear with
# the features that produce them.
STEP_KEYS = (
    "epoch",
    "reward/mean",
    "reward/std",
    "accuracy",
    "answer_rate",
    "response_length/mean",
    "response_length/max",
    "think_length/mean",
    "truncated_fraction",
    "soft_fraction",
    "rollout_logp_mismatch",
    "loss",
    "policy_loss",
    "kl/mean",
    "clip_fraction",
    "clip_fraction/low",
    "clip_fraction/high",
    "dual_clip_fraction",
    "ratio/mean",
    "grad_norm",
    "lr",
    "optimizer_steps",
    "skipped_steps",
    "tokens_per_second",
    "time/rollout",
    "time/reward",
    "time/logprob",
    "time/update",
    "time/step",
)

# the key of a feature -> its metrics.jsonl keys (algorithms/filtering.py)
OPTIONAL_KEYS = {
    "grpo.dynamic_sampling": (
        "dynamic_sampling/gen_rounds",  # rollout rounds of the step (1 + extra rounds)
        "dynamic_sampling/filtered_fraction",  # groups with zero reward spread / groups generated
        "dynamic_sampling/groups",  # groups trained on
        "dynamic_sampling/short_groups",  # num_prompts_per_step - groups (the cap was reached)
    ),
    "loss_fn.overlong_filtering": ("overlong/filtered_fraction",),  # trained responses left out
    "env.overlong_penalty": ("overlong/penalty_mean", "overlong/penalized_fraction"),
    # dedicated generation ranks (train/generation.py), since the last step's line: the refits'
    # seconds (within time/rollout or a validation) and bytes (the first pipeline stage's), and
    # the fraction of the wall time the generation ranks were neither decoding nor loading weights
    "policy.generation.colocated.enabled": (
        "time/refit",
        "refit/bytes",
        "async/generation_idle_fraction",
    ),
    # the step's trajectories' age in RL steps (extra dynamic-sampling rounds: 0), and the
    # fraction of the step the trainer waited for its rows (time/rollout / time/step)
    "grpo.async_grpo.enabled": (
        "async/trajectory_age_mean",
        "async/trajectory_age_max",
        "async/training_idle_fraction",
    ),
    # algorithms/loss.py `correction_metrics`: over every scored position, then its soft and its
    # discrete ones; a /min or /max over no position is null
    "loss_fn.use_importance_sampling_correction": tuple(
        name
        for part in ("", "/soft", "/discrete")
        for name in (
            *(f"is_weight{part}/{s}" for s in ("mean", "min", "max", "truncated_fraction")),
            f"gen_kl{part}",
        )
    ),
}

# key in metrics.jsonl -> label in the progress line (and its format)
PROGRESS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("answer_rate", "answered", "{:.2f}"),
    ("response_length/mean", "len", "{:.1f}"),
    ("soft_fraction", "soft", "{:.2f}"),
    ("kl/mean", "kl", "{:.2e}"),
    ("entropy/mean", "ent", "{:.3f}"),
    ("clip_fraction", "clip", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_second", "tok/s", "{:.0f}"),
    ("time/step", "s", "{:.1f}"),
)


def format_progress(step: int, max_steps: int, metrics: dict) -> str:
    """One console line; a non-finite gradient norm means the optimizer step was skipped."""
    parts = [f"step {step}/{max_steps}"]
    groups = metrics.get("dynamic_sampling/groups")
    if groups is not None:
        rounds = metrics["dynamic_sampling/gen_rounds"]
        part = f"groups {groups} in {rounds} round{'s' if rounds != 1 else ''}"
        short = metrics.get("dynamic_sampling/short_groups", 0)
        if short:
            part += f" ({short} short of {groups + short}: training on what there is)"
        parts.append(part)
    for key, label, fmt in PROGRESS:
        value = metrics.get(key)
        if key == "grad_norm" and _non_finite(value):
            parts.append(f"skipped (grad norm {value})")
        elif value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


def json_line(record: dict) -> str:
    """`record` as one line of strict JSON: non-finite floats become null, keys sorted."""
    return json.dumps(_strict(record), sort_keys=True, allow_nan=False)


def _non_finite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


class MetricsLog:
    def __init__(self, cfg: LoggerCfg, run_config: dict, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(cfg.log_dir)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(
            json.dumps(run_config, indent=2, sort_keys=True, default=str)
        )
        if cfg.tensorboard_enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if cfg.wandb_enabled:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "logger.wandb_enabled=true: the wandb package is not installed (pip install wandb)"
                ) from None
            self._wandb = wandb.init(
                project=cfg.wandb.project, name=cfg.wandb.name, config=run_config, dir=str(self.dir)
            )

    def truncate_after(self, step: int) -> None:
        """Forget lines of steps after `step` (they were logged after the checkpoint we resume from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict, max_steps: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json_line(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)  # TensorBoard takes NaN
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        print(format_progress(step, max_steps or step, record), flush=True)

    def write_json(self, name: str, record: dict) -> None:
        """A run-level result (e.g. final_validation.json) beside metrics.jsonl, as strict JSON."""
        if self.enabled:
            (self.dir / name).write_text(
                json.dumps(_strict(record), indent=2, sort_keys=True, allow_nan=False) + "\n"
            )

    def at_start_validation(self) -> dict | None:
        """The validation before training, from step 1's line (for the summary of a resumed run)."""
        if not self.enabled or not self.path.is_file():
            return None
        prefix = "val_at_start/"
        for row in read_metrics(self.dir):
            found = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
            if found:
                return found
        return None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value):
    """Tensors and numpy scalars -> Python numbers (JSON-able)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _strict(value):
    """Nested dicts/lists with non-finite floats replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return None if _non_finite(_plain(value)) else _plain(value)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics.jsonl in this run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
