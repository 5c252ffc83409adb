"""The soft-token math, model-free and TP-aware: mixtures, samplers, noises, log-densities.

Nothing here knows about GPTModel. Logits arrive as this TP rank's vocabulary shard
[N, W] (W = padded vocabulary / TP; fp32 or bf16, computed in fp32), described by a
`VocabShard`; every TP rank calls the same function and gets the same answer.

Modules (each owns one concept):
- `vocab`: `VocabShard` (global id range, real vocabulary size, TP group), padding
  masking, collectives, vocabulary-wide logsumexp, entropy and K-logit gathers.
- `truncation`: `Truncation` (temperature -> top-k -> top-p on the truncated
  distribution -> min-p), exact cross-shard top candidates (ties: lower id wins).
- `rng`: the sampling-noise state in Megatron's RNG tracker (`seed_noise_rng`,
  `noise_rng`, `noise_seed`, `noise_state`, `split_noise`) and seed-recomputable Gaussian
  vectors.
- `records`: `MixtureRecord` (the per-position record) and `SampledStep`.
- `noises`: the soft noise kinds `GumbelNoise`, `GaussianNoise`, `DirichletNoise`,
  `EmbeddingNoise`: mixture weights, stored noise and log-density of each.
- `samplers`: `DiscreteSampler`, `SoftSampler`, `MultiplexSampler` (Multiplex Thinking).
- `logprob`: `Scorer`, `log_density_from_logits`, `log_density_from_hidden` (chunked),
  `log_density_and_entropy_from_hidden` (chunked, with the entropy term's entropies),
  `objective_from_hidden` (chunked, a per-position loss and its gradient in one pass: training).
Which samplers and scorer a recipe runs is `algorithms/registry.py`'s choice; the mixture input
embedding itself is a model patch: `model_patches.mixture_embedding`.

Rollout (every TP rank of the last pipeline stage):
    seed_noise_rng(noise_seed(grpo.seed, dp_rank))          # once, after init_distributed
    shard = VocabShard.of_group(padded_vocab, vocab_size, parallel.groups.tp)
    sampler = SoftSampler(Truncation(top_k=5, top_p=0.95), 5, GumbelNoise(tau=0.1))
    step = sampler.sample(last_logits_shard, shard)          # per step -> SampledStep, [N] rows
    offset = sampler.input_offset(step)                      # [N, h] for embedding noise, else None
    x = mixture_embedding(word_embeddings, step.mix_ids[:, None], step.mix_weights[:, None],
                          None if offset is None else offset[:, None])   # next decoder_input

Samplers (`sample(logits [N, W], shard) -> SampledStep`), by `name`:
    discrete          temperature / top-k / top-p / min-p / greedy (top_k=1); one-hot record
    gumbel            SofT-GRPO: g = log(pt + 1e-6) + c * clamp(Gumbel, -1.5, 3), w = softmax(g / tau_g)
    gaussian          x = pt + sigma * N(0, 1) on the support, w = x / sum(x)
    dirichlet         x ~ Gamma(pt, 1) on the support, w = x / sum(x)
    embedding_noise   w = pt; the input gets + sigma * N(0, I_h) drawn from a per-row seed
    multiplex         K independent draws from the truncated p; w_k = p(i_k) / sum_j p(i_j)
                      (or 1 / K); slots in draw order, noise = log p(i_k) (scored per slot)
Soft steps sort slots by weight descending (out-of-support last); slot 0 is the
transcript token. Noise is drawn for the K selected slots after the global selection,
from the tracker state, identically on every TP rank: same seed, same step at any TP.

Record fields (`MixtureRecord`; [N] for a step, [B, S] for a batch; K = mixture size):
    tokens [...] int64        transcript token
    mix_ids [..., K] int64    mixture ids (one-hot rows: slot 0 = token, others id 0)
    mix_weights [..., K] fp32 exact weights fed to the model
    noise [..., K] fp32       stored noisy value (gumbel: g; gaussian/dirichlet: x; else 0)
    support [..., K] bool     slot in the truncated support
    is_soft [...] bool        soft step (vs prompt / discrete)
    noise_seed [...] int64    embedding-noise seed (else 0)
    thinking [...] bool       drawn by the thinking sampler (soft steps and the marker step)
`SampledStep` adds log_density [N]: the rollout's own log-density of the step.

Trainer: with `scorer = Scorer(noise, soft_temperature, discrete_temperature)`,
    logp = log_density_from_hidden(hidden [s, b, h], output_weight_shard, records [b, s], scorer, shard)
scores record j+1 at position j (shift the records first). Discrete positions:
log_softmax(l / T)[token], T the thinking temperature on the marker step (`thinking`) and the
answer temperature elsewhere; soft positions: the noise kind's density from l[ids] / T (the
embedding-noise density also needs `embedding=InputEmbedding(table_shard, shard)`).
`log_density_from_logits` computes the same from given logits;
    logp, entropy = log_density_and_entropy_from_hidden(...same arguments...)
adds the entropy of softmax(l / T) over the whole vocabulary (T of the row's phase) for
the loss's optional entropy term.
"""

from megatron_softgrpo.soft.logprob import (
    ScoredObjective,
    Scorer,
    TokenObjective,
    log_density_and_entropy_from_hidden,
    log_density_from_hidden,
    log_density_from_logits,
    objective_from_hidden,
)
from megatron_softgrpo.soft.noises import (
    DirichletNoise,
    EmbeddingNoise,
    GaussianNoise,
    GumbelNoise,
    InputEmbedding,
    SoftNoise,
)
from megatron_softgrpo.soft.records import MixtureRecord, SampledStep
from megatron_softgrpo.soft.rng import (
    noise_rng,
    noise_seed,
    noise_state,
    seed_noise_rng,
    set_noise_state,
    split_noise,
)
from megatron_softgrpo.soft.samplers import (
    DiscreteSampler,
    MultiplexSampler,
    Sampler,
    SoftSampler,
)
from megatron_softgrpo.soft.truncation import Truncation
from megatron_softgrpo.soft.vocab import VocabShard

__all__ = [
    "DirichletNoise",
    "DiscreteSampler",
    "EmbeddingNoise",
    "GaussianNoise",
    "GumbelNoise",
    "InputEmbedding",
    "MixtureRecord",
    "MultiplexSampler",
    "SampledStep",
    "Sampler",
    "Scorer",
    "ScoredObjective",
    "SoftNoise",
    "SoftSampler",
    "TokenObjective",
    "Truncation",
    "VocabShard",
    "log_density_and_entropy_from_hidden",
    "log_density_from_hidden",
    "log_density_from_logits",
    "objective_from_hidden",
    "noise_rng",
    "noise_seed",
    "noise_state",
    "seed_noise_rng",
    "set_noise_state",
    "split_noise",
]
