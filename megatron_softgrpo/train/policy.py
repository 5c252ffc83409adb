"""PolicyWorker: this rank's shard of the policy (and of the frozen reference), its log-probs and updates.

Every rank of the job builds one worker after `init_distributed` and calls every method
(they are collectives). Everything runs through Megatron's schedule
(`models/forward.py::run_schedule`), so tensor, pipeline and data parallelism all work the same
way:

- Inputs: position j reads the mixture of stored record j (`mixture_embedding`, detached,
  docs/algorithm.md section 2) as `decoder_input` on the first pipeline stage; attention is causal with
  no explicit mask (flash attention on GPU) and positions are 0..S-1 (rows are right-padded).
- Scoring: the model returns its final hidden states (`model_patches.output_layer.final_hidden_states`); the
  output at position j - 1 scores record j, only at the positions of `loss_mask`, against this
  rank's vocabulary shard of the output weight: `compute_logprobs` with
  `soft.log_density_from_hidden`, the training forward with `soft.objective_from_hidden`, which
  computes the same log-densities (bitwise) chunk by chunk and sums the loss's per-position terms
  (`algorithms.loss.token_terms` x `aggregation_weights`) as it goes, taking their gradient from
  the chunk's logits at once instead of recomputing them in backward. With
  `loss_fn.entropy_coef > 0` it also computes each scored position's entropy (at the temperature
  the position was sampled at) for the loss's entropy term. Old, reference and new log-probs
  therefore agree when the weights do: bitwise (ratio exactly 1 on the first update) when each row is
  computed in the same company, i.e. `logprob_batch_size == train_micro_batch_size` and
  mini-batches are row slices of the batch the old log-probs were computed on (same length
  S, micro-batch boundaries aligned); otherwise up to float rounding.
- Data parallelism: every rank is given the **whole** batch (identical on all ranks). Data-
  parallel rank r takes the contiguous block of rows [r B/D, (r+1) B/D) and splits it into
  micro-batches of consecutive rows; gradients are averaged over the D ranks by DDP.
  `compute_logprobs` pads the batch with unscored rows up to a multiple of D x micro-batch and
  all-gathers the result, so every rank returns the log-probs of all B rows.
- The loss is handed in: `train_step(batch, loss)` (NeMo-RL's `policy.train(data, loss_fn)`). The
  worker tells it the step's shape (`StepShape`: Megatron divides each micro-batch's loss by the
  number of micro-batches, DDP averages over ranks, the mini-batch's scored positions), sums the
  per-position objective it returns in the fused chunked pass (or, for a loss whose terms couple
  positions, `per_position` False, takes every scored log-density of a micro-batch with its
  graph and lets autograd differentiate the loss's sum), and reduces its named metrics over
  micro-batches and data-parallel ranks without knowing what they are (summed, or a min or max
  where the loss's `metric_reduction` says so). It hands the loss the batch fields the loss
  names (`PolicyLoss.batch_fields`) and each position's `is_soft` flag. With the loss's
  normalisation, one step at any TP/PP/DP gives the update of one rank on the same mini-batch,
  provided the micro-batches hold the same rows (global rows / micro-batch size alike).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_softgrpo.algorithms.loss import PolicyLoss, StepShape
from megatron_softgrpo.batch import Batch
from megatron_softgrpo.config.schema import PolicyCfg
from megatron_softgrpo.distributed import (
    ParallelState,
    broadcast_from_last_stage,
    gather_data_parallel,
    max_data_parallel_,
    sum_data_parallel,
)
from megatron_softgrpo.models.build import token_alignment
from megatron_softgrpo.models.forward import CAUSAL, position_ids, run_schedule
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import resolve_model_source
from megatron_softgrpo.soft import (
    InputEmbedding,
    MixtureRecord,
    Scorer,
    VocabShard,
    log_density_and_entropy_from_hidden,
    log_density_from_hidden,
    objective_from_hidden,
)
from megatron_softgrpo.train.optimizer import build_optimizer, build_scheduler, wrap_ddp
from model_patches.mixture_embedding import mixture_embedding
from model_patches.optimizer_step import guarded_step
from model_patches.output_layer import final_hidden_states
from model_patches.wgrad_accumulation import add_to_main_grad


@dataclass(frozen=True)
class TrainStepResult:
    """One optimizer step; identical on every rank."""

    # the loss's metrics (named by it), then grad_norm (before clipping) and lr: metrics.jsonl names
    metrics: dict[str, float]
    updated: bool  # False: non-finite gradient norm, the weights were left unchanged


def _unwrapped(model_chunk):
    return getattr(model_chunk, "module", model_chunk)  # DDP -> GPTModel


class PolicyWorker:
    """The policy's Megatron model, optimizer and (optionally) frozen reference on this rank.

    It is handed how positions are scored (`scorer`) and, per update, the loss: it knows neither
    the algorithm nor the rest of the recipe (`train/loop.py::build_worker` unpacks a recipe)."""

    def __init__(
        self,
        policy: PolicyCfg,
        parallel: ParallelState,
        scorer: Scorer,
        *,
        reference: bool,
        planned_steps: int,
    ):
        """`reference`: keep a frozen copy for a KL penalty; `planned_steps`: optimizer steps of the
        run (the learning-rate schedule's length)."""
        mcfg = policy.megatron_cfg
        running = (parallel.tp, parallel.pp)
        wanted = (mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size)
        if running != wanted:
            raise ValueError(
                f"init_distributed set TP, PP = {running}; the recipe asks for {wanted}"
            )
        self.policy, self.parallel, self.scorer = policy, parallel, scorer
        self.source = resolve_model_source(policy.model_name)
        self.model, self.padded_vocab_size = load_model(
            self.source, mcfg, parallel, policy.precision
        )
        self.ddp = wrap_ddp(self.model, mcfg, parallel)
        self.optimizer = build_optimizer(self.ddp, mcfg, policy.precision)
        self.scheduler = build_scheduler(self.optimizer, mcfg, planned_steps)
        self.reference = self._frozen_reference() if reference else None
        self.vocab = VocabShard.of_group(
            self.padded_vocab_size, self.source.arch.vocab_size, parallel.groups.tp
        )
        self.device = next(self.model.parameters()).device
        # FP8: every pass runs rows padded to a multiple of this length (b x s then is one too)
        self.seq_alignment = token_alignment(self.model.config)
        self.optimizer_steps = 0  # updates applied (checkpointed)
        self.skipped_steps = 0  # updates skipped for a non-finite gradient norm (checkpointed)

    def _frozen_reference(self):
        policy = self.policy
        model, _ = load_model(self.source, policy.megatron_cfg, self.parallel, policy.precision)
        model.requires_grad_(False)
        return model

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch, *, reference: bool = False) -> torch.Tensor:
        """Record-aligned log-densities [B, S] (fp32, 0 where loss_mask is False) under the
        current policy, or under the frozen reference model; the same on every rank. A per-slot
        scorer's are [B, S, K], 0 outside its `scored_units`."""
        model = self.reference if reference else self.ddp
        if model is None:
            raise ValueError("no reference model: loss_fn.reference_policy_kl_penalty is 0")
        parallel = self.parallel
        dp, dp_rank = parallel.dp, parallel.dp_rank
        per_rank = math.ceil(batch.num_rows / dp)
        micro = min(self.policy.logprob_batch_size, per_rank)
        per_rank = math.ceil(per_rank / micro) * micro
        local = (
            batch.only()
            .padded_rows(per_rank * dp)
            .row_slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        )
        local = self._aligned(local).to(self.device)
        micro_batches = [local.row_slice(i, i + micro) for i in range(0, per_rank, micro)]
        outputs = self._run(model, micro_batches, self._logp_output, forward_only=True)
        if parallel.last_stage:
            logp = torch.cat([o["logp"] for o in outputs]).float()
        else:
            logp = torch.empty(self._units_shape(local), device=self.device)
        broadcast_from_last_stage(parallel, logp)
        logp = gather_data_parallel(parallel, logp)
        return logp[: batch.num_rows, : batch.seq_len]

    def train_step(self, batch: Batch, loss: PolicyLoss) -> TrainStepResult:
        """One optimizer step of `loss` on the mini-batch `batch` (gradient accumulation over
        micro-batches)."""
        missing = [name for name in loss.batch_fields if getattr(batch, name) is None]
        if missing:
            raise ValueError(f"train_step needs {', '.join(missing)}: the loss reads them")
        dp, dp_rank = self.parallel.dp, self.parallel.dp_rank
        micro = self.policy.train_micro_batch_size
        per_rank = batch.num_rows // dp
        local = batch.only(*loss.batch_fields)
        local = self._aligned(local.row_slice(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        local = local.to(self.device)
        micro_batches = [local.row_slice(i, i + micro) for i in range(0, per_rank, micro)]
        units = int(self.scorer.scored_units(batch.loss_mask, batch.records).sum())
        step = StepShape(len(micro_batches), dp, int(batch.loss_mask.sum()), units)

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        output_fn = functools.partial(self._loss_output, loss, step)
        outputs = self._run(self.ddp, micro_batches, output_fn, forward_only=False)
        reduced = self._reduce_metrics(
            outputs, loss.zero_metrics(self.device), loss.metric_reduction
        )
        metrics = loss.report(reduced, step)
        outcome = guarded_step(self.optimizer, self.scheduler)
        if outcome.updated:
            self.optimizer_steps += 1
        else:
            self.skipped_steps += 1
        metrics.update(grad_norm=outcome.grad_norm, lr=outcome.lr)
        return TrainStepResult(metrics, outcome.updated)

    # ------------------------------------------------------------------ forward pieces

    def _aligned(self, batch: Batch) -> Batch:
        return batch.padded_positions(
            math.ceil(batch.seq_len / self.seq_alignment) * self.seq_alignment
        )

    def _run(self, model, micro_batches: list[Batch], output_fn, forward_only: bool) -> list[dict]:
        """Megatron's schedule over the micro-batches; per-micro-batch dicts on the last stage ([] elsewhere)."""
        return run_schedule(
            self.parallel,
            model,
            functools.partial(self._forward_step, output_fn),
            micro_batches,
            seq_length=micro_batches[0].seq_len,
            micro_batch_size=micro_batches[0].num_rows,
            forward_only=forward_only,
        )

    def _forward_step(self, output_fn, data_iterator, model_chunk):
        micro_batch = next(data_iterator)
        gpt = _unwrapped(model_chunk)
        b, s = micro_batch.num_rows, micro_batch.seq_len
        decoder_input = self._inputs(gpt, micro_batch) if gpt.pre_process else None
        with final_hidden_states(gpt):
            output = model_chunk(
                None, position_ids(b, s, self.device), CAUSAL, decoder_input=decoder_input
            )
        return output, functools.partial(output_fn, gpt, micro_batch)

    def _inputs(self, gpt, micro_batch: Batch) -> torch.Tensor:
        """decoder_input [s, b, h]: the stored mixtures (plus the embedding-noise offset), detached."""
        records, noise = micro_batch.records, self.scorer.noise
        offset = noise.input_offset(records) if noise is not None else None
        x = mixture_embedding(
            gpt.embedding.word_embeddings,
            records.mix_ids,
            records.mix_weights,
            offset,
            sequence_parallel=gpt.config.sequence_parallel,
        )
        # a leaf that requires grad, so activation recomputation still builds a graph; no weight sees it
        return x.requires_grad_()

    def _units_shape(self, batch: Batch) -> tuple[int, ...]:
        """The shape of the batch's log-densities: [B, S], or [B, S, K] for a per-slot scorer."""
        slots = (batch.records.mixture_size,) if self.scorer.per_slot else ()
        return (batch.num_rows, batch.seq_len, *slots)

    def _scored_inputs(self, gpt, output: torch.Tensor, micro_batch: Batch):
        """(hidden [n, 1, h] scoring each unit, the units' records [1, n], their indices) from the
        model output [b, s(/TP), h]. A unit is a position of `loss_mask`, indexed (row, position),
        or for a per-slot scorer one of its scored slots, indexed (row, position, slot): scored as
        that slot's token, one-hot, drawn by the sampler of its position."""
        hidden = output.transpose(0, 1)  # [s, b, h]
        if gpt.config.sequence_parallel and self.vocab.distributed:
            # backward only splits: the scorers sum the TP ranks' gradients themselves
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.vocab.group
            )
        records = micro_batch.records
        at = self.scorer.scored_units(micro_batch.loss_mask, records).nonzero(as_tuple=True)
        if self.scorer.per_slot:
            slots = MixtureRecord.discrete(records.mix_ids[at], records.mixture_size)
            scored = replace(slots, thinking=records.thinking[at[:2]])
        else:
            scored = records.map(lambda t: t[at])
        b_idx, j_idx = at[:2]
        inputs = hidden[j_idx - 1, b_idx].unsqueeze(1)  # the output at j - 1 scores record j
        return inputs, scored.map(lambda t: t.unsqueeze(0)), at

    def _scores(self, gpt, output: torch.Tensor, micro_batch: Batch) -> torch.Tensor:
        """Record-aligned logp of the scored units (0 elsewhere), no gradient needed."""
        inputs, records, at = self._scored_inputs(gpt, output, micro_batch)
        logp = torch.zeros(self._units_shape(micro_batch), device=output.device)
        if at[0].numel() == 0:
            return logp
        scored, _ = self._log_densities(gpt, inputs, records)
        return logp.index_put(at, scored[0].float())

    def _log_densities(self, gpt, inputs, records, with_entropy: bool = False):
        """(logp [1, n], entropy [1, n] or None) of the scored records, differentiable."""
        score = log_density_and_entropy_from_hidden if with_entropy else log_density_from_hidden
        out = score(
            inputs,
            self._output_weight(gpt),
            records,
            self.scorer,
            self.vocab,
            embedding=self._input_embedding(gpt),
        )
        return out if with_entropy else (out, None)

    @staticmethod
    def _output_weight(gpt) -> torch.Tensor:
        return (
            gpt.shared_embedding_or_output_weight()
            if gpt.share_embeddings_and_output_weights
            else gpt.output_layer.weight
        )

    def _input_embedding(self, gpt) -> InputEmbedding | None:
        """The input table shard, for a density that reads it (tied on later stages: config/checks.py)."""
        if self.scorer.noise is None or not self.scorer.noise.needs_input_table:
            return None
        table = (
            gpt.embedding.word_embeddings.weight
            if gpt.pre_process
            else gpt.shared_embedding_or_output_weight()
        )
        return InputEmbedding(table, self.vocab)

    def _logp_output(self, gpt, micro_batch: Batch, output: torch.Tensor):
        return torch.zeros((), device=output.device), {
            "logp": self._scores(gpt, output, micro_batch)
        }

    def _loss_output(
        self, loss: PolicyLoss, step: StepShape, gpt, micro_batch: Batch, output: torch.Tensor
    ):
        """The micro-batch's loss, summed position by position as the chunked scorer computes the
        log-densities (`objective_from_hidden`: no logits recomputed in backward), and its metrics."""
        inputs, records, at = self._scored_inputs(gpt, output, micro_batch)
        objective = loss.micro_batch(
            micro_batch.loss_mask,
            at,
            micro_batch.old_logp,
            micro_batch.advantages,
            micro_batch.ref_logp,
            step,
            rollout_logp=micro_batch.rollout_logp,
            is_soft=micro_batch.records.is_soft,
        )
        if at[0].numel() == 0:  # nothing scored: a zero on the graph the schedule backpropagates
            value = 0 * output.sum()
        elif not loss.per_position:  # terms coupling positions: every log-density, then autograd
            logp, entropy = self._log_densities(gpt, inputs, records, loss.needs_entropy)
            n = logp.shape[1]
            value = objective(logp[0], None if entropy is None else entropy[0], slice(0, n)).sum()
        else:
            value = objective_from_hidden(
                inputs,
                self._output_weight(gpt),
                records,
                self.scorer,
                self.vocab,
                objective,
                loss.needs_entropy,
                embedding=self._input_embedding(gpt),
                weight_gradient=add_to_main_grad,
            ).value
        return value, {"metrics": objective.metrics}

    def _reduce_metrics(
        self, outputs: list[dict], zeros: dict[str, torch.Tensor], reduction
    ) -> dict[str, float]:
        """Each named metric reduced over micro-batches and data-parallel ranks as the loss's
        `reduction(name)` says ("sum", "min" or "max"), on every rank (`zeros`: every name at its
        reduction's identity, for the stages that hold no outputs)."""
        names = list(zeros)
        per_micro = [o["metrics"] for o in outputs] or [zeros]
        values = torch.stack([torch.stack([m[n] for n in names]) for m in per_micro])
        how = [reduction(n) for n in names]
        summed = torch.tensor([h == "sum" for h in how], device=values.device)
        # a min is the max of the negated values: one SUM and one MAX all-reduce cover all three
        sign = torch.tensor([-1.0 if h == "min" else 1.0 for h in how], dtype=values.dtype)
        values = values * sign.to(values.device)
        sums, maxima = values[:, summed].sum(dim=0), values[:, ~summed].amax(dim=0)
        broadcast_from_last_stage(self.parallel, sums)
        sum_data_parallel(self.parallel, sums)
        if maxima.numel():
            broadcast_from_last_stage(self.parallel, maxima)
            max_data_parallel_(self.parallel, maxima)
        out = torch.empty_like(values[0])
        out[summed], out[~summed] = sums, maxima
        return dict(zip(names, (out * sign.to(out.device)).tolist()))
