"""The SofT-GRPO / GRPO loop (`softgrpo train`), one RL step at a time (docs/architecture.md "Flow of one RL step"):

    prompts -> rollout (G per prompt; each data-parallel rank decodes its block of prompts)
            -> rewards -> (dynamic sampling: drop zero-spread groups, draw more prompts) -> group advantages
            -> old-policy and reference-policy log-probs (no grad, the training function)
            -> mini-batched optimizer steps (Megatron schedule; TP, PP, DP)
            -> metrics, periodic validation and checkpoints

At the end the held-out accuracy before and after training goes to `final_validation.json` in
`logger.log_dir` (metrics.jsonl keeps exactly one line per step). The parts are built by
`train/setup.py`; resuming and saving are `train/checkpointing.py`'s, the end of the run
`train/summary.py`'s.

The algorithm only changes how the thinking phase is sampled and scored (the sampler and
scorer built from `softgrpo.*`); everything else is shared.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from megatron_softgrpo.algorithms.advantages import broadcast_to_positions, group_advantages
from megatron_softgrpo.algorithms.filtering import group_rows, informative_groups
from megatron_softgrpo.algorithms.loss import PolicyLoss
from megatron_softgrpo.batch import Batch
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.data.datasets import PromptDataset
from megatron_softgrpo.data.prompts import encode_prompt
from megatron_softgrpo.data.sampler import PromptSampler
from megatron_softgrpo.distributed import ParallelState, gather_data_parallel
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.rewards.answers import extract_answer
from megatron_softgrpo.rewards.shaping import shaped_rewards
from megatron_softgrpo.train.checkpointing import resume_run, save_run
from megatron_softgrpo.train.generation import Colocated, Dedicated
from megatron_softgrpo.train.metrics_log import MetricsLog, ProgressLine, Timings
from megatron_softgrpo.train.policy import PolicyWorker
from megatron_softgrpo.train.preemption import REQUEUE_EXIT_CODE, PreemptionWatcher
from megatron_softgrpo.train.summary import summarize_run


@dataclass(frozen=True)
class Ahead:
    """A request submitted before its step (grpo.async_grpo: up to max_trajectory_age_steps
    ahead; else just before it)."""

    problems: list
    epoch: int  # the sampler's epoch after drawing them: the step's metrics.jsonl "epoch"
    step: int  # RL steps completed when it was submitted: its trajectories' age counts from here
    version: int  # optimizer steps of the policy that decodes it


@dataclass
class Trainer:
    """The RL loop over the parts `train/setup.py` builds; every rank runs it."""

    cfg: RecipeCfg
    parallel: ParallelState
    tokenizer: object
    val_data: PromptDataset | None
    worker: PolicyWorker
    loss: PolicyLoss  # handed to every update: the worker knows no loss
    sampler: PromptSampler
    generation: Colocated | Dedicated  # where rollouts are decoded (train/generation.py)
    reward: object  # texts, answers, metadata -> rewards (rewards/registry.py)
    log: MetricsLog
    watcher: PreemptionWatcher
    step: int = 0
    _last_val: tuple[int, dict] | None = None  # (step, result) of the latest validation
    _ahead: deque[Ahead] = field(default_factory=deque)  # submitted, not yet trained on

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        cfg, watcher = self.cfg, self.watcher
        try:
            self.step, ahead = resume_run(cfg.checkpointing, self.worker, self.sampler, self.log)
            if ahead is not None and ahead["ahead"]:  # requests in flight at the save
                kind = type(self.generation).__name__
                if ahead["kind"] != kind:
                    raise UserError(
                        f"{cfg.checkpointing.checkpoint_dir}: the latest checkpoint holds "
                        f"requests decoded ahead by {ahead['kind']} generation; resume with "
                        "its policy.generation.colocated and grpo.async_grpo settings"
                    )
                self._ahead = deque(ahead["ahead"])
                self.generation.restore(ahead["generation"])
            if watcher.should_stop(self.parallel):  # signalled during start-up: nothing new to save
                return self._requeue()
            first_val = (
                self._validate()
                if self.val_data is not None and cfg.grpo.val_at_start and self.step == 0
                else None
            )
            while self.step < cfg.grpo.max_num_steps:
                times = Timings()
                with times("time/step"), times("time/rollout"):
                    self._submit_ahead()  # (dedicated: after the rows in flight came back)
                if not self._ahead:  # the epochs ran out
                    break
                metrics = self._rl_step(times)
                self.step += 1
                if (
                    self.val_data is not None
                    and cfg.grpo.val_period
                    and self.step % cfg.grpo.val_period == 0
                ):
                    metrics.update(_prefixed("val/", self._validate()))
                if self.step == 1 and first_val is not None:
                    metrics.update(_prefixed("val_at_start/", first_val))
                metrics.update(self.generation.metrics())
                self.log.log(self.step, metrics, cfg.grpo.max_num_steps)
                stop = watcher.should_stop(self.parallel)
                if cfg.checkpointing.enabled and (
                    stop or self.step % cfg.checkpointing.save_period == 0
                ):
                    self._save()
                if stop:
                    return self._requeue()
            if cfg.checkpointing.enabled and self.step % cfg.checkpointing.save_period:
                self._save()
            self._finish(first_val)
            return 0
        finally:
            self.generation.close()
            self.log.close()
            close = getattr(getattr(self.reward, "grader", None), "close", None)
            if close is not None:
                close()

    def _requeue(self) -> int:
        if self.parallel.main:
            print(
                f"[softgrpo] stopped by signal at step {self.step}; exit {REQUEUE_EXIT_CODE} (requeue to resume)",
                flush=True,
            )
        return REQUEUE_EXIT_CODE

    def _save(self) -> None:
        ahead = {
            "ahead": list(self._ahead),
            "generation": self.generation.ahead_state(),
            "kind": type(self.generation).__name__,
        }
        save_run(
            self.cfg.checkpointing, self.worker, self.step, self.sampler, self.tokenizer, ahead
        )

    def _finish(self, first_val: dict | None) -> None:
        """The held-out summary and the training curves."""
        final = None
        if self.val_data is not None:
            # the last step's own validation when it had one; else a fresh one (a collective: every rank)
            final = (
                self._last_val[1]
                if self._last_val is not None and self._last_val[0] == self.step
                else self._validate()
            )
        if self.parallel.main:
            val_size = 0 if self.val_data is None else len(self.val_data.problems)
            summarize_run(self.cfg.logger, self.log, self.step, val_size, first_val, final)

    # ------------------------------------------------------------------ one RL step

    def _rl_step(self, times: Timings | None = None) -> dict:
        """rollout (+ rewards) -> advantages -> scoring -> update -> metrics (`times`: the
        step's so far)."""
        times = Timings() if times is None else times
        with times("time/step"):
            ahead = self._ahead.popleft()
            with times("time/rollout"):
                local = self.generation.collect()
            generated = [self._graded(ahead.problems, local, times, ahead.version)]
            batch, extra = generated[0], {}
            if self.cfg.grpo.dynamic_sampling.enabled:
                batch, extra = self._dynamic_sampling(generated, times)
            with times("time/logprob"):
                batch = self._advantages(batch, extra)
                batch = self._score(batch)
            with times("time/update"):
                updates = self._update(batch)
        rolled = Batch.cat(generated)  # rollout statistics cover every response of the step
        metrics = {"epoch": ahead.epoch, **step_metrics(rolled, batch, updates, self.worker, times)}
        metrics |= {**extra, **times}
        if self.cfg.grpo.async_grpo.enabled:  # extra rounds (dynamic sampling) are decoded now
            ages = [self.step - ahead.step] + [0] * (len(generated) - 1)
            metrics["async/trajectory_age_mean"] = sum(
                a * b.num_rows for a, b in zip(ages, generated)
            ) / max(1, rolled.num_rows)
            metrics["async/trajectory_age_max"] = max(ages)
            metrics["async/training_idle_fraction"] = times["time/rollout"] / times["time/step"]
        if self.cfg.env.overlong_penalty is not None:
            metrics["overlong/penalty_mean"] = float(rolled.penalty.mean())
            metrics["overlong/penalized_fraction"] = float((rolled.penalty < 0).float().mean())
        return {k: v for k, v in metrics.items() if v is not None}

    # ------------------------------------------------------------------ the stages

    def _submit_ahead(self) -> None:
        """Draw and submit the prompts of the steps to come, up to the trajectory-age bound (0:
        the next step's), never past the run's steps or epochs."""
        grpo = self.cfg.grpo
        depth = grpo.async_grpo.max_trajectory_age_steps if grpo.async_grpo.enabled else 0
        while (
            len(self._ahead) <= depth
            and self.step + len(self._ahead) < grpo.max_num_steps
            and self.sampler.epoch < grpo.max_num_epochs
        ):
            problems = self.sampler.next_batch()
            self.generation.submit(self._requests(problems), grpo.num_generations_per_prompt)
            version = self.worker.optimizer_steps
            self._ahead.append(Ahead(problems, self.sampler.epoch, self.step, version))

    def _requests(self, problems, per_rank: int | None = None) -> list[list[list[int]]]:
        """Each data-parallel rank's block of prompts, encoded (`per_rank` each, the last ones
        possibly fewer; default: equal shares)."""
        dp = self.parallel.dp
        return [self._prompts(b) for b in _blocks(problems, per_rank or len(problems) // dp, dp)]

    def _rollout(self, problems, times: Timings) -> Batch:
        """`problems` decoded now (after any request submitted ahead) and graded."""
        g = self.cfg.grpo.num_generations_per_prompt
        with times("time/rollout"):
            local = self.generation.generate(self._requests(problems), g)
        return self._graded(problems, local, times, self.worker.optimizer_steps)

    def _graded(self, problems, local: Batch, times: Timings, version: int) -> Batch:
        """This rank's block of rows graded, then every rank's rows on every rank, with their
        shaped rewards; `version`: the policy that decoded them."""
        g, parallel = self.cfg.grpo.num_generations_per_prompt, self.parallel
        mine = _blocks(problems, len(problems) // parallel.dp, parallel.dp)[parallel.dp_rank]
        with times("time/reward"):
            correct, answered = self._grade(local.texts, [p for p in mine for _ in range(g)])
        batch = replace(local, correct=correct, answered=answered).gather_data_parallel(parallel)
        rewards, penalty = shaped_rewards(
            batch.correct,
            batch.answered,
            batch.truncated,
            batch.response_lengths,
            self.cfg.env,
            self.cfg.policy.generation.max_new_tokens,
        )
        return replace(batch, rewards=rewards, penalty=penalty, policy_version=version)

    def _advantages(self, batch: Batch, metrics: dict) -> Batch:
        """Group advantages on every scored position (truncated responses out of the loss under
        overlong filtering, still in their group's baseline)."""
        cfg = self.cfg
        advantages = (
            group_advantages(
                batch.rewards,
                cfg.grpo.num_generations_per_prompt,
                normalize=cfg.grpo.normalize_rewards,
            )
            if batch.num_rows
            else batch.rewards  # dynamic sampling left no group to train on
        )
        mask = batch.loss_mask
        if cfg.loss_fn.overlong_filtering:
            mask = mask & ~batch.truncated.unsqueeze(1)
            metrics["overlong/filtered_fraction"] = (
                float(batch.truncated.float().mean()) if batch.num_rows else 0.0
            )
        return replace(batch, loss_mask=mask, advantages=broadcast_to_positions(advantages, mask))

    def _score(self, batch: Batch) -> Batch:
        """Old- and reference-policy log-densities of the scored positions (no grad)."""
        if not batch.num_rows:
            return batch
        worker = self.worker
        old = worker.compute_logprobs(batch)
        ref = (
            worker.compute_logprobs(batch, reference=True) if worker.reference is not None else None
        )
        # the rollout's log-densities of the same units (per slot for a per-slot scorer)
        rollout = worker.scorer.rollout_units(batch.rollout_logp, batch.records)
        return replace(batch, old_logp=old, ref_logp=ref, rollout_logp=rollout)

    def _update(self, batch: Batch) -> list:
        """One optimizer step per `train_global_batch_size` rows; a short last mini-batch gets
        unscored rows up to a multiple of DP x micro-batch."""
        mini = self.cfg.policy.train_global_batch_size
        unit = self.parallel.dp * self.cfg.policy.train_micro_batch_size
        updates = []
        for i in range(0, batch.num_rows, mini):
            part = batch.row_slice(i, i + mini)
            part = part.padded_rows(math.ceil(part.num_rows / unit) * unit)
            updates.append(self.worker.train_step(_trim(part), self.loss))
        return updates

    def _dynamic_sampling(self, generated: list[Batch], times: Timings) -> tuple[Batch, dict]:
        """Keep the groups with nonzero reward spread, drawing further batches of prompts until
        `num_prompts_per_step` are kept, `max_gen_rounds` extra rounds were used, or the epochs
        run out; a short step trains on what there is. Informative groups beyond the target are
        dropped (as in verl's DAPO recipe). Every rank holds the whole gathered batch of each round,
        so every rank keeps the same groups and runs the same number of rounds and updates."""
        grpo = self.cfg.grpo
        g, target = grpo.num_generations_per_prompt, grpo.num_prompts_per_step
        kept: list[Batch] = []
        num_kept = num_informative = 0
        while True:
            informative = informative_groups(generated[-1].rewards, g).nonzero().flatten()
            num_informative += len(informative)
            take = informative[: target - num_kept]
            kept.append(generated[-1].select(group_rows(take, g)))
            num_kept += len(take)
            if (
                num_kept >= target
                or len(generated) > grpo.dynamic_sampling.max_gen_rounds
                or self.sampler.epoch >= grpo.max_num_epochs
            ):
                break
            generated.append(self._rollout(self.sampler.next_batch(), times))
        num_groups = sum(b.num_rows for b in generated) // g
        return Batch.cat(kept), {
            "dynamic_sampling/gen_rounds": len(generated),
            "dynamic_sampling/filtered_fraction": 1 - num_informative / num_groups,
            "dynamic_sampling/groups": num_kept,
            "dynamic_sampling/short_groups": target - num_kept,
        }

    def _prompts(self, problems) -> list[list[int]]:
        data = self.cfg.data
        return [
            encode_prompt(self.tokenizer, p.problem, data.prompt_template, data.system_prompt)
            for p in problems
        ]

    def _grade(self, texts: list[str], problems) -> tuple[torch.Tensor, torch.Tensor]:
        """(named reward, an answer can be read in env.answer_format) per response."""
        correct = self.reward(texts, [p.answer for p in problems], [p.metadata for p in problems])
        answered = [extract_answer(t, self.cfg.env.answer_format) is not None for t in texts]
        return torch.tensor(correct, dtype=torch.float32), torch.tensor(answered)

    def _validate(self) -> dict:
        """One sample per validation problem with the training decoding; accuracy and mean reward."""
        problems, dp = self.val_data.problems, self.parallel.dp
        per_rank = math.ceil(len(problems) / dp)
        mine = _blocks(problems, per_rank, dp)[self.parallel.dp_rank]
        # on the model's device: the data-parallel group is NCCL on GPU
        correct, answered, lengths, valid = (
            torch.zeros(per_rank, device=self.worker.device) for _ in range(4)
        )
        steps = self.cfg.policy.generation.max_new_tokens
        progress = ProgressLine("validation", len(mine), steps, self.parallel.main)
        # every rank calls it (dedicated generation ranks serve all blocks in one request)
        traj = self.generation.generate(self._requests(problems, per_rank), 1, progress)
        if mine:
            got, has = self._grade(traj.texts, mine)
            correct[: len(mine)], answered[: len(mine)] = got, has.float()
            lengths[: len(mine)] = traj.response_lengths.float()
            if self.parallel.main:
                _print_samples(
                    mine, traj.texts, got.tolist(), self.cfg.logger.num_val_samples_to_print
                )
        valid[: len(mine)] = 1
        correct, answered, lengths, valid = (
            gather_data_parallel(self.parallel, x) for x in (correct, answered, lengths, valid)
        )
        n = valid.sum().clamp(min=1)
        result = {
            "accuracy": float(((correct >= 0.5).float() * valid).sum() / n),
            "answer_rate": float((answered * valid).sum() / n),
            "response_length": float((lengths * valid).sum() / n),
        }
        self._last_val = (self.step, result)
        return result


def _print_samples(problems, texts: list[str], rewards: list[float], count: int) -> None:
    """The first `count` validation responses of this rank (logger.num_val_samples_to_print)."""
    for i, (p, text, reward) in enumerate(list(zip(problems, texts, rewards))[:count]):
        print(
            f"[softgrpo] validation sample {i + 1}: {p.id} | answer {p.answer} | reward {reward:.2f}\n"
            f"  problem: {p.problem}\n  response: {text}",
            flush=True,
        )


def _blocks(problems: list, size: int, dp: int) -> list[list]:
    """Each data-parallel rank's consecutive `size` problems (the last ones may be short or empty)."""
    return [problems[r * size : (r + 1) * size] for r in range(dp)]


def _prefixed(prefix: str, d: dict) -> dict:
    return {prefix + k: v for k, v in d.items()}


def _combined(name: str, values: list) -> float | None:
    """A metric over the step's updates: a min or max by its name (`PolicyLoss.metric_reduction`;
    None where an update had no position to take it over), else the mean."""
    how = PolicyLoss.metric_reduction(name)
    if how == "sum":
        return sum(values) / len(values)
    present = [v for v in values if v is not None]
    return (min if how == "min" else max)(present) if present else None


def step_metrics(rolled: Batch, trained: Batch, updates: list, worker, times: Timings) -> dict:
    """The step's metrics.jsonl values: rollout statistics over every response generated in the
    step (`rolled`), and statistics of the trained rows and their optimizer steps."""
    rewards, lengths = rolled.rewards, rolled.response_lengths
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "accuracy": float((rolled.correct >= 0.5).float().mean()),
        "answer_rate": float(rolled.answered.float().mean()),
        "response_length/mean": float(lengths.float().mean()),
        "response_length/max": int(lengths.max()),
        "think_length/mean": float(rolled.think_lengths.float().mean()),
        "truncated_fraction": float(rolled.truncated.float().mean()),
        **_update_metrics(trained, updates, worker.scorer),
        "optimizer_steps": worker.optimizer_steps,
        "skipped_steps": worker.skipped_steps,
        "tokens_per_second": int(lengths.sum()) / times["time/step"],
    }


def _update_metrics(batch: Batch, updates: list, scorer) -> dict:
    """Statistics of the trained rows and their optimizer steps (none when nothing was trained)."""
    mask = batch.loss_mask
    if not updates:
        return {}
    means = {k: _combined(k, [u.metrics[k] for u in updates]) for k in updates[0].metrics}
    units = scorer.scored_units(mask, batch.records)
    return {
        "soft_fraction": float((batch.records.is_soft & mask).sum() / mask.sum().clamp(min=1)),
        "rollout_logp_mismatch": float(  # per scored unit: position, or slot (per-slot scores)
            ((batch.rollout_logp.exp() - batch.old_logp.exp()).abs() * units).sum()
            / units.sum().clamp(min=1)
        ),
        **means,  # the loss's metrics and grad_norm over the step's updates
        "lr": updates[-1].metrics["lr"],
    }


def _trim(batch: Batch) -> Batch:
    """Drop trailing columns that are padding in every row of the mini-batch."""
    used = batch.loss_mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return batch.positions(lambda t: t[:, :length])
