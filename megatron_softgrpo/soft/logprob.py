"""Log-densities (and, for the optional entropy term, entropies) of scored positions for the
policy update (docs/algorithm.md sections 2-3).

The entry points compute the same log-densities:
- `log_density_from_logits(logits, records, scorer, shard)`: on given vocab-sharded logits.
- `log_density_from_hidden(hidden, output_weight, records, scorer, shard)`: the old/reference passes,
  from the final hidden states [s, b, h] and this rank's output-weight shard [W, h]. It
  never holds [s, b, W] logits: positions are processed in chunks, soft positions need only
  their K logits (h . W[ids], no vocabulary-wide matmul), discrete positions' chunk logits
  are recomputed in backward, so extra memory is bounded by one chunk.
- `log_density_and_entropy_from_hidden(...)`: the same log-densities (bitwise) and, in the
  same chunked pass, the entropy of softmax(l / T) over the whole vocabulary at each
  position. T is the temperature the position was sampled at, as for its log-density:
  the answer temperature for discrete positions (the thinking one for the marker step), the
  thinking temperature for soft positions (whose mixture was drawn from that distribution's
  truncation). Soft positions then need their
  chunk's full logits too (in forward and, recomputed, in backward).
- `objective_from_hidden(..., objective)`: the training path. The same log-densities (and
  entropies), and the sum of a per-position objective of them (the policy loss), whose
  gradient is taken from each chunk's logits in the forward: nothing is recomputed.

Discrete positions (is_soft False) score log_softmax(l / T)[token] over the whole vocabulary, T the
temperature of the sampler that drew them: T_thinking for the step that completes the think-end
marker (drawn by the thinking sampler, `records.thinking`), T_answer for the others; soft positions
score the scorer's noise density from l[ids] / T_thinking. The
records are the ones being scored: logits at position j score record j+1, so shift the
records before calling. Gradients reach the logits (hence hidden states and output
weight) only. Every TP rank gets the same values; each gets the gradient of its shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_softgrpo.distributed import copy_to_tensor_parallel, sum_tensor_parallel
from megatron_softgrpo.soft.noises import InputEmbedding, SoftNoise
from megatron_softgrpo.soft.records import MixtureRecord
from megatron_softgrpo.soft.vocab import (
    VocabShard,
    compute_dtype,
    compute_dtype_of,
    gather_logits,
    log_normalizer,
    softmax_entropy,
)

DEFAULT_CHUNK_SIZE = (
    1024  # positions per chunk: a chunk of discrete positions holds [chunk, W] fp32 logits
)


@dataclass(frozen=True)
class Scorer:
    """How positions are scored: the soft positions' noise kind and each phase's temperature.

    `per_slot` (Multiplex Thinking): a soft position is not scored as one density; each of its
    slots is scored as a token drawn at the thinking temperature, so the log-densities are per
    scored slot ([B, S, K], `scored_units`) and the loss has one term per slot."""

    noise: SoftNoise | None  # None: no soft positions (discrete GRPO), or per_slot
    soft_temperature: float = 1.0  # the thinking sampler's: soft positions and the marker step
    discrete_temperature: float = 1.0  # the answer sampler's: the other discrete positions
    per_slot: bool = False

    def scored_units(self, loss_mask: torch.Tensor, records: MixtureRecord) -> torch.Tensor:
        """What is scored, one log-density each: the positions of `loss_mask` [B, S], or per_slot
        their slots [B, S, K]: every slot of a soft step (its K draws, duplicates included), slot 0
        of a discrete one (its in-support slot)."""
        return loss_mask.unsqueeze(-1) & records.support if self.per_slot else loss_mask

    def rollout_units(self, rollout_logp: torch.Tensor, records: MixtureRecord) -> torch.Tensor:
        """The rollout's log-density of each scored unit: `rollout_logp` [B, S] itself, or per_slot
        [B, S, K]: a soft slot's stored log-probability (its noise), a discrete step's in slot 0."""
        if not self.per_slot:
            return rollout_logp
        k = records.mixture_size
        discrete = torch.nn.functional.pad(rollout_logp.unsqueeze(-1), (0, k - 1))  # slot 0
        return torch.where(records.is_soft.unsqueeze(-1), records.noise, discrete)

    def discrete_temperatures(self, thinking: torch.Tensor) -> float | torch.Tensor:
        """The scoring temperature of discrete positions whose `thinking` flags [n] are given: the
        thinking temperature where the thinking sampler drew the row (the marker step), the
        answer temperature elsewhere. One float when no row was drawn while thinking, else one
        float64 per row, on the flags' device (one host sync)."""
        if not bool(thinking.any()):
            return self.discrete_temperature
        per_row = torch.full(thinking.shape, self.discrete_temperature, dtype=torch.float64)
        return per_row.to(thinking.device).masked_fill(thinking, self.soft_temperature)


def _at(temperature: float | torch.Tensor, index) -> float | torch.Tensor:
    """The temperatures of rows `index`: the one temperature, or the per-row values there."""
    return temperature[index] if isinstance(temperature, torch.Tensor) else temperature


def _column(temperature: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """The temperature shaped to scale rows of [n, W] values: a float, or [n, 1] of `dtype`."""
    if isinstance(temperature, torch.Tensor):
        return temperature.to(dtype).unsqueeze(-1)
    return temperature


def discrete_terms(scaled: torch.Tensor, tokens: torch.Tensor, shard: VocabShard):
    """(log_softmax(s)[token], logsumexp(s)) over the whole sharded vocabulary; scaled logits s [n, W]
    as `VocabShard.scaled` makes them."""
    log_norm = log_normalizer(scaled, shard)
    return gather_logits(scaled, tokens.unsqueeze(-1), shard).squeeze(-1) - log_norm, log_norm


def discrete_log_density(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, shard: VocabShard
) -> torch.Tensor:
    """log_softmax(l / T)[token] over the whole sharded vocabulary: logits [n, W], tokens [n] -> [n]."""
    return discrete_terms(shard.scaled(logits, temperature), tokens, shard)[0]


# ------------------------------------------------------------------ from given logits


def _split(records: MixtureRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the discrete and of the soft positions (identical on every TP rank)."""
    return (~records.is_soft).nonzero().squeeze(-1), records.is_soft.nonzero().squeeze(-1)


def _owned_only(values: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    return torch.where(shard.owns(ids), values, torch.zeros_like(values))


def _soft_log_density(
    partial: torch.Tensor, records: MixtureRecord, scorer: Scorer, shard: VocabShard, embedding
):
    """The noise density of soft positions from the K logits this rank owns [n_s, K] (zeros elsewhere)."""
    if scorer.noise is None:
        raise ValueError(
            "soft positions to score, but the scorer has no soft noise (discrete GRPO)"
        )
    return scorer.noise.log_density(
        sum_tensor_parallel(partial, shard.group) / scorer.soft_temperature, records, embedding
    )


def log_density_from_logits(
    logits: torch.Tensor,
    records: MixtureRecord,
    scorer: Scorer,
    shard: VocabShard,
    embedding: InputEmbedding | None = None,
) -> torch.Tensor:
    """logp [...] of `records` [...] scored by the sharded logits [..., W] (fp32 or bf16)."""
    lead = records.tokens.shape
    flat = records.flatten()
    logits = logits.reshape(-1, logits.shape[-1])
    discrete, soft = _split(flat)
    logp = torch.zeros(
        flat.tokens.shape[0], dtype=compute_dtype_of(logits.dtype), device=logits.device
    )
    if discrete.numel():
        discrete_logits = (
            logits if discrete.numel() == logits.shape[0] else logits[discrete]
        )  # no copy when all are
        temperature = scorer.discrete_temperatures(flat.thinking[discrete])
        values = discrete_log_density(discrete_logits, flat.tokens[discrete], temperature, shard)
        logp = logp.index_put((discrete,), values)
    if soft.numel():
        ids = flat.mix_ids[soft]
        partial = _owned_only(
            compute_dtype(logits[soft].gather(-1, shard.local_index(ids))), ids, shard
        )
        logp = logp.index_put(
            (soft,),
            _soft_log_density(partial, flat.map(lambda t: t[soft]), scorer, shard, embedding),
        )
    return logp.reshape(lead)


# ------------------------------------------------------------------ chunked, from hidden states


@dataclass(frozen=True)
class _VocabTerms:
    """What the gradient of a vocabulary-wide softmax needs from the forward, per row."""

    log_norm: torch.Tensor  # logsumexp(l / T)
    entropy: torch.Tensor | None = None  # H, when the entropy is computed
    scaled: torch.Tensor | None = (
        None  # the rows' scaled logits l / T when kept (fused path); else recomputed
    )


@dataclass(frozen=True)
class _ChunkSaved:
    discrete: _VocabTerms | None = None  # the chunk's discrete positions (when it has any)
    soft: _VocabTerms | None = (
        None  # its soft positions (with the entropy only: their density needs K logits)
    )


@dataclass
class _Chunking:
    """The chunked computation. Products are taken in the weight's dtype, as Megatron's output
    layer does, so that bf16 models score the logits the rollout sampled from."""

    records: MixtureRecord  # flat [N]
    scorer: Scorer
    shard: VocabShard
    chunk_size: int
    embedding: InputEmbedding | None
    with_entropy: bool

    @functools.cached_property
    def pieces(self) -> list[tuple[slice, torch.Tensor, torch.Tensor, float | torch.Tensor]]:
        """Per chunk: its positions, the indices of its discrete and soft ones, and the discrete ones'
        temperature (`Scorer.discrete_temperatures`); one host sync in all."""
        is_soft, thinking = torch.stack([self.records.is_soft, self.records.thinking]).cpu()
        device = self.records.is_soft.device
        out = []
        for start in range(0, is_soft.shape[0], self.chunk_size):
            piece = slice(start, min(start + self.chunk_size, is_soft.shape[0]))
            soft = is_soft[piece]
            temperature = self.scorer.discrete_temperatures(thinking[piece][~soft])
            if isinstance(temperature, torch.Tensor):
                temperature = temperature.to(device)
            out.append(
                (
                    piece,
                    (~soft).nonzero().squeeze(-1).to(device),
                    soft.nonzero().squeeze(-1).to(device),
                    temperature,
                )
            )
        return out

    def _soft_partial(self, h: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor):
        """(owned K logits [n_s, K] in the compute dtype, the K weight rows [n_s, K, h])."""
        k_vectors = weight[self.shard.local_index(ids)]
        dots = torch.bmm(k_vectors, h.unsqueeze(-1)).squeeze(-1)
        return _owned_only(compute_dtype(dots), ids, self.shard), k_vectors

    def forward_chunk(
        self, hidden, weight, piece, discrete, soft, t_discrete, keep_logits: bool = False
    ):
        """(logp of the chunk's rows, their entropy or None, what the gradient needs); `keep_logits`
        keeps the scaled vocabulary-wide logits in it, for a gradient taken right away.
        `t_discrete`: the discrete positions' temperature (one, or one per row)."""
        records = self.records.map(lambda t: t[piece])
        h = hidden[piece].to(weight.dtype)
        logp = torch.zeros(h.shape[0], dtype=compute_dtype_of(weight.dtype), device=h.device)
        entropy = torch.zeros_like(logp) if self.with_entropy else None
        saved_discrete = saved_soft = None
        if discrete.numel():
            scaled = self.shard.scaled(h[discrete] @ weight.t(), t_discrete)
            values, log_norm = discrete_terms(scaled, records.tokens[discrete], self.shard)
            logp[discrete] = values.to(logp.dtype)
            entropy_d = self._entropy_into(entropy, discrete, scaled, log_norm)
            saved_discrete = _VocabTerms(log_norm, entropy_d, scaled if keep_logits else None)
        if soft.numel():
            partial, _ = self._soft_partial(h[soft], weight, records.mix_ids[soft])
            values = _soft_log_density(
                partial, records.map(lambda t: t[soft]), self.scorer, self.shard, self.embedding
            )
            logp[soft] = values.to(logp.dtype)
            if self.with_entropy:
                scaled = self.shard.scaled(h[soft] @ weight.t(), self.scorer.soft_temperature)
                log_norm = log_normalizer(scaled, self.shard)
                entropy_s = self._entropy_into(entropy, soft, scaled, log_norm)
                saved_soft = _VocabTerms(log_norm, entropy_s, scaled if keep_logits else None)
        return logp, entropy, _ChunkSaved(saved_discrete, saved_soft)

    def _entropy_into(self, entropy, index, scaled, log_norm) -> torch.Tensor | None:
        """Writes the entropy of softmax(scaled) into entropy[index] and returns it (None without entropy)."""
        if entropy is None:
            return None
        values = softmax_entropy(scaled, log_norm, self.shard)
        entropy[index] = values.to(entropy.dtype)
        return values

    def _scaled(self, h, weight, terms: _VocabTerms, temperature) -> torch.Tensor:
        """The rows' scaled logits: kept by the forward, or recomputed (one more GEMM)."""
        return (
            terms.scaled
            if terms.scaled is not None
            else self.shard.scaled(h @ weight.t(), temperature)
        )

    def _vocab_gradient(
        self, scaled, terms: _VocabTerms, temperature, g_ell, g_entropy, dtype
    ) -> torch.Tensor:
        """d/dl of  -g_ell logsumexp(l / T) + g_entropy H  for scaled logits l / T [n, W], in `dtype`.

        = -(p / T) (g_ell + g_entropy (log p + H)) with p = softmax(l / T) from the scaled logits
        and the forward's logsumexp, 0 on padding columns (scaled -inf there). g_ell or g_entropy
        may be None (no such term). Works in place on `scaled` (consumed); with the entropy it
        takes one more fp32 [n, W] buffer.
        """
        log_p = scaled.sub_(terms.log_norm.unsqueeze(-1))
        if g_entropy is None:
            row_scale = -(g_ell / temperature).to(log_p.dtype)  # a float or one per row
            return torch.mul(
                log_p.exp_(),
                row_scale.unsqueeze(-1),
                out=torch.empty(log_p.shape, dtype=dtype, device=log_p.device),
            )
        probs = log_p.exp()
        log_p[:, self.shard.real_width :] = 0.0  # padding columns: p = 0 there, keep 0 * -inf out
        factor = log_p.add_(terms.entropy.unsqueeze(-1)).mul_(
            g_entropy.to(log_p.dtype).unsqueeze(-1)
        )  # in place
        if g_ell is not None:
            factor.add_(g_ell.to(log_p.dtype).unsqueeze(-1))
        factor.mul_(probs)
        del probs
        return torch.mul(
            factor,
            -1.0 / _column(temperature, factor.dtype),
            out=torch.empty(factor.shape, dtype=dtype, device=factor.device),
        )

    def backward_chunk(
        self,
        hidden,
        weight,
        piece,
        discrete,
        soft,
        t_discrete,
        saved: _ChunkSaved,
        grads,
        grad_hidden,
        grad_weight,
    ):
        """One chunk's share of the output layer's gradients: grad_hidden rows set, grad_weight accumulated.

        `grads` are the chunk's (grad_logp, grad_entropy or None). Discrete positions: d logp / d l =
        (onehot(token) - softmax(l / T)) / T (plus the entropy's term) from the kept or recomputed
        logits, in one fp32 [n_d, W] buffer (two with the entropy). Soft positions: autograd through
        the noise density down to their K logits only, plus, with the entropy, its term on their
        full logits.
        """
        records = self.records.map(lambda t: t[piece])
        h = hidden[piece].to(weight.dtype)
        g_ell, g_entropy = grads
        g_h = grad_hidden[piece]
        if discrete.numel():
            temperature = t_discrete
            h_d, g = h[discrete], g_ell[discrete]
            scaled = self._scaled(h_d, weight, saved.discrete, temperature)
            d_full = self._vocab_gradient(
                scaled,
                saved.discrete,
                temperature,
                g,
                None if g_entropy is None else g_entropy[discrete],
                weight.dtype,
            )
            del scaled
            tokens = records.tokens[discrete]
            mine = self.shard.owns(tokens)
            rows_mine = mine.nonzero().squeeze(-1)
            at_token = (g[mine] / _at(temperature, mine)).to(d_full.dtype)
            d_full.index_put_(
                (rows_mine, tokens[mine] - self.shard.start), at_token, accumulate=True
            )
            g_h[discrete] = (d_full @ weight).to(g_h.dtype)
            _accumulate_product(grad_weight, d_full.t(), h_d)
        if soft.numel():
            h_s, ids = h[soft], records.mix_ids[soft]
            partial, k_vectors = self._soft_partial(h_s, weight, ids)
            partial = partial.detach().requires_grad_()
            with torch.enable_grad():
                values = _soft_log_density(
                    partial, records.map(lambda t: t[soft]), self.scorer, self.shard, self.embedding
                )
                (d_partial,) = torch.autograd.grad(values, partial, g_ell[soft].to(values.dtype))
            d_dots = _owned_only(d_partial, ids, self.shard).to(weight.dtype)  # [n_s, K]
            g_h_soft = torch.bmm(d_dots.unsqueeze(1), k_vectors).squeeze(1).to(g_h.dtype)
            per_slot = d_dots.unsqueeze(-1) * h_s.unsqueeze(1)  # [n_s, K, h]
            owned = self.shard.owns(ids)
            grad_weight.index_add_(
                0, self.shard.local_index(ids)[owned], per_slot[owned].to(grad_weight.dtype)
            )
            if g_entropy is not None:
                temperature = self.scorer.soft_temperature
                scaled = self._scaled(h_s, weight, saved.soft, temperature)
                d_full = self._vocab_gradient(
                    scaled, saved.soft, temperature, None, g_entropy[soft], weight.dtype
                )
                del scaled
                g_h_soft += (d_full @ weight).to(g_h.dtype)
                _accumulate_product(grad_weight, d_full.t(), h_s)
            g_h[soft] = g_h_soft


def _accumulate_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, with half-precision products summed into the fp32 total by the GEMM itself on CUDA."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    elif total.is_cuda:
        torch.addmm(total, a, b, total.dtype, out=total)
    else:
        total.add_((a @ b).to(total.dtype))


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weight_gradient_buffer(plan: _Chunking, weight: torch.Tensor) -> torch.Tensor:
    """The output weight's gradient accumulator: fp32 (fp64 for fp64) across chunks. One chunk of
    discrete positions is one GEMM, whose own fp32 accumulation suffices: its gradient is kept in the
    weight's dtype, as autograd through materialised logits would (no fp32 buffer to fill and cast)."""
    (_, _, soft, _), *more = plan.pieces
    dtype = weight.dtype if not more and soft.numel() == 0 else _accumulation_dtype(weight)
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


class _ChunkedScores(torch.autograd.Function):
    """hidden [N, h], weight [W, h] -> logp [N] (and entropy [N] when the plan asks for it)."""

    @staticmethod
    def forward(ctx, hidden, weight, plan: _Chunking):
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight)
        with torch.no_grad():
            pieces = [plan.forward_chunk(hidden, weight, *piece) for piece in plan.pieces]
        ctx.chunk_saved = [saved for _, _, saved in pieces]
        logp = torch.cat([logp for logp, _, _ in pieces])
        return (
            (logp, torch.cat([entropy for _, entropy, _ in pieces])) if plan.with_entropy else logp
        )

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight = ctx.saved_tensors
        grad_hidden = torch.zeros(
            hidden.shape, dtype=_accumulation_dtype(hidden), device=hidden.device
        )
        grad_weight = _weight_gradient_buffer(ctx.plan, weight)
        for piece, saved in zip(ctx.plan.pieces, ctx.chunk_saved):
            grads = (grad_logp[piece[0]], None if grad_entropy is None else grad_entropy[piece[0]])
            ctx.plan.backward_chunk(hidden, weight, *piece, saved, grads, grad_hidden, grad_weight)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None


# (weight, total, scale) -> whether it took the output weight's gradient total * scale (a 0-dim
# scale: no host sync) into a buffer of the trainer's; autograd then gets a placeholder, else the
# gradient itself
WeightGradientSink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]


class _ChunkedObjective(torch.autograd.Function):
    """hidden [N, h], weight [W, h] -> (sum of the objective, logp [N], entropy [N] or None), the
    objective's gradient taken chunk by chunk in the forward from the logits just computed."""

    @staticmethod
    def forward(ctx, hidden, weight, plan: _Chunking, objective: TokenObjective, sink):
        grad_hidden = torch.zeros(
            hidden.shape, dtype=_accumulation_dtype(hidden), device=hidden.device
        )
        grad_weight = _weight_gradient_buffer(plan, weight)
        logps, entropies, values = [], [], []
        for piece in plan.pieces:
            logp, entropy, saved = plan.forward_chunk(hidden, weight, *piece, keep_logits=True)
            leaves = [logp.requires_grad_()] + (
                [entropy.requires_grad_()] if entropy is not None else []
            )
            with torch.enable_grad():
                value = objective(logp, entropy, piece[0]).sum()
                grads = torch.autograd.grad(
                    value, leaves, allow_unused=True, materialize_grads=True
                )
            grads = (grads[0], grads[1] if entropy is not None else None)
            plan.backward_chunk(hidden, weight, *piece, saved, grads, grad_hidden, grad_weight)
            del saved  # the chunk's kept logits
            logps.append(logp.detach())
            entropies.append(None if entropy is None else entropy.detach())
            values.append(value.detach())
        ctx.grads = (grad_hidden, grad_weight, hidden.dtype, weight, sink)
        logp = torch.cat(logps)
        entropy = torch.cat(entropies) if plan.with_entropy else None
        ctx.mark_non_differentiable(*(t for t in (logp, entropy) if t is not None))
        return torch.stack(values).sum(), logp, entropy

    @staticmethod
    def backward(ctx, grad_value, *_):
        grad_hidden, grad_weight, hidden_dtype, weight, sink = ctx.grads
        if sink is not None and sink(weight, grad_weight, grad_value):
            grad_weight = torch.empty_like(weight)  # the sink took it: never read
        else:
            grad_weight = _times(grad_weight, grad_value, weight.dtype)
        return _times(grad_hidden, grad_value, hidden_dtype), grad_weight, None, None, None


def _times(total: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """total * scale as a new tensor of `dtype` (an fp32 total is cast first: no full-size fp32
    temporary, and plain vectorised passes); `total` is kept, for a graph backpropagated twice."""
    return total * scale if total.dtype == dtype else total.to(dtype).mul_(scale)


def _flat_inputs(hidden, records, shard, chunk_size, sequence_parallel):
    """hidden [s(/TP), b, h] -> [b s, h] (row-major like the records), gathered over the TP group."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if sequence_parallel and shard.distributed:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, group=shard.group)
    else:
        hidden = copy_to_tensor_parallel(hidden, shard.group)
    b, s = records.tokens.shape
    if hidden.shape[:2] != (s, b):
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} do not match records [b={b}, s={s}] (expected [s, b, h])"
        )
    return hidden.transpose(0, 1).reshape(b * s, hidden.shape[-1])


def _scores_from_hidden(
    hidden,
    output_weight,
    records,
    scorer,
    shard,
    chunk_size,
    embedding,
    sequence_parallel,
    with_entropy,
):
    flat_hidden = _flat_inputs(hidden, records, shard, chunk_size, sequence_parallel)
    plan = _Chunking(records.flatten(), scorer, shard, chunk_size, embedding, with_entropy)
    out = _ChunkedScores.apply(flat_hidden, output_weight, plan)
    b, s = records.tokens.shape
    return tuple(t.view(b, s) for t in out) if with_entropy else out.view(b, s)


def log_density_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    records: MixtureRecord,
    scorer: Scorer,
    shard: VocabShard,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embedding: InputEmbedding | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """logp [b, s] of `records` [b, s] scored by the final hidden states [s, b, h].

    `hidden` is Megatron's layout: the full sequence, or this rank's sequence slice when
    `sequence_parallel` (it is gathered here, like the output layer would). The hidden
    gradient is summed over the TP ranks as the output layer's would be.
    `output_weight` is this rank's [W, h] shard (model.shared_embedding_or_output_weight()
    or output_layer.weight).
    """
    return _scores_from_hidden(
        hidden,
        output_weight,
        records,
        scorer,
        shard,
        chunk_size,
        embedding,
        sequence_parallel,
        False,
    )


def log_density_and_entropy_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    records: MixtureRecord,
    scorer: Scorer,
    shard: VocabShard,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embedding: InputEmbedding | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [b, s], entropy [b, s]): `log_density_from_hidden`'s values (bitwise) and the entropy
    of softmax(l / T) over the whole vocabulary (padding excluded) at each position, T being the
    temperature that scores the row (the scorer's discrete temperature on discrete positions, its soft
    (thinking) temperature on soft positions and on the marker step); both differentiable, computed in one chunked pass. Arguments as `log_density_from_hidden`.
    """
    return _scores_from_hidden(
        hidden,
        output_weight,
        records,
        scorer,
        shard,
        chunk_size,
        embedding,
        sequence_parallel,
        True,
    )


# (logp [n], entropy [n] or None, the positions' slice of the flattened [b s] records) -> the
# objective of each position [n], differentiable in logp and entropy; the loss is their sum.
TokenObjective = Callable[[torch.Tensor, torch.Tensor | None, slice], torch.Tensor]


@dataclass(frozen=True)
class ScoredObjective:
    value: (
        torch.Tensor
    )  # scalar: sum of the objective over all positions, differentiable in hidden and weight
    logp: torch.Tensor  # [b, s], detached: `log_density_from_hidden`'s values, bitwise
    entropy: torch.Tensor | None  # [b, s], detached (with_entropy), else None


def objective_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    records: MixtureRecord,
    scorer: Scorer,
    shard: VocabShard,
    objective: TokenObjective,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embedding: InputEmbedding | None = None,
    sequence_parallel: bool = False,
    weight_gradient: WeightGradientSink | None = None,
) -> ScoredObjective:
    """sum_j objective_j(logp_j, H_j) over `records` [b, s] scored by the hidden states
    [s, b, h], for a loss that is a sum of per-position terms (the policy loss is).

    The training path. Each chunk's logits serve its log-densities and, with the objective's
    gradient known right away, the gradients of the hidden states and the output weight: three
    GEMMs per chunk as for materialised logits, where `log_density_from_hidden` + autograd
    recomputes the logits in backward (four). Extra memory stays bounded by one chunk, plus
    the output weight's gradient held from this forward to the backward. Values and gradients
    equal `log_density_from_hidden` (or `log_density_and_entropy_from_hidden`) followed by the
    objective, up to float rounding; `logp` and `entropy` are their values bitwise.
    Arguments as `log_density_from_hidden`; `weight_gradient` may take the output weight's
    gradient where the trainer accumulates it (`WeightGradientSink`).
    """
    flat_hidden = _flat_inputs(hidden, records, shard, chunk_size, sequence_parallel)
    plan = _Chunking(records.flatten(), scorer, shard, chunk_size, embedding, with_entropy)
    value, logp, entropy = _ChunkedObjective.apply(
        flat_hidden, output_weight, plan, objective, weight_gradient
    )
    b, s = records.tokens.shape
    return ScoredObjective(value, logp.view(b, s), None if entropy is None else entropy.view(b, s))
