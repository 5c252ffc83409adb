"""Multiplex Thinking (docs/algorithm.md, "Multiplex Thinking") against float64 references: the
sampler's slot frequencies (chi-square), its weights and mixed input, the slot-0 marker rule, the
per-slot scores against transformers, the per-slot loss and its gradient against a closed form,
the rollout correction per slot, and TP=2 against one rank."""

from __future__ import annotations

import math

import pytest
import soft_reference as ref
import torch
from builders import ANSWER_T, THINKING_T, K, mixture_logits64, new_worker, recipe
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.algorithms.loss import PolicyLoss, StepShape
from megatron_softgrpo.batch import Batch
from megatron_softgrpo.config.schema import LossCfg
from megatron_softgrpo.rollout.phases import ANSWER, THINK, PhaseMachine
from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.rollout.tapes import NoiseTapes
from megatron_softgrpo.soft import (
    DiscreteSampler,
    MixtureRecord,
    MultiplexSampler,
    Scorer,
    Truncation,
    VocabShard,
    seed_noise_rng,
)
from model_patches.mixture_embedding import local_mixture

VOCAB, PADDED = 50, 64
SHARD = VocabShard.whole(PADDED, VOCAB)


def row_logits(seed=2, rows=1):
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(VOCAB, generator=gen) * 1.5
    return torch.cat([row, torch.full((PADDED - VOCAB,), 9.0)]).expand(rows, -1).contiguous()


def sample(sampler, logits, seed=13):
    seed_noise_rng(seed)
    return sampler.sample(logits, SHARD)


# ------------------------------------------------------------------ the sampler


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= the statistic) for X ~ chi-square with (cells - 1) degrees of freedom."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.parametrize(
    "trunc",
    [dict(), dict(top_k=6, top_p=0.9), dict(temperature=0.6, top_p=0.8, min_p=0.05)],
    ids=["whole-vocabulary", "top-k-top-p", "top-p-min-p"],
)
def test_every_slot_draws_from_the_truncated_distribution(trunc):
    """Each of the K slots is an independent draw with replacement: its token frequencies pass a
    chi-square test against the truncated probabilities (fixed seed), no token outside the support
    is ever drawn, and two slots of a row agree as often as independent draws would."""
    rows, k = 30_000, 3
    step = sample(MultiplexSampler(Truncation(**trunc), k), row_logits(rows=rows))
    probs = ref.truncated_probs(row_logits()[:, :VOCAB], **trunc)[0]
    support = probs > 0
    for slot in range(k):
        counts = torch.bincount(step.mix_ids[:, slot], minlength=PADDED).double()
        assert not bool(counts[VOCAB:].any()) and not bool(counts[:VOCAB][~support].any())
        kept = support.nonzero().squeeze(-1)
        assert chi_square_p_value(counts[kept], probs[kept]) > 1e-3, slot
    same = (step.mix_ids[:, 0] == step.mix_ids[:, 1]).double().mean()
    collision = (probs**2).sum()  # P(two independent draws agree)
    assert abs(float(same - collision)) <= 5 * math.sqrt(collision * (1 - collision) / rows)


@pytest.mark.parametrize("uniform", [False, True], ids=["weighted", "uniform"])
def test_weights_records_and_mixed_input_match_float64(uniform):
    """w_k = p(i_k) / sum_j p(i_j) with the whole-vocabulary p (or 1 / K), the stored per-slot
    log-probabilities, the step's log-density (their sum) and sum_k w_k E[i_k], all in float64."""
    temperature, k = 0.8, 4
    logits = torch.randn(64, PADDED, generator=torch.Generator().manual_seed(5)) * 2
    logits[:, VOCAB:] = 40.0
    step = sample(MultiplexSampler(Truncation(temperature, top_k=8), k, uniform), logits)
    log_p = torch.log_softmax(logits[:, :VOCAB].double() / temperature, dim=-1)
    slot_logp = log_p.gather(-1, step.mix_ids)
    expected = torch.full_like(slot_logp, 1 / k) if uniform else torch.softmax(slot_logp, dim=-1)
    torch.testing.assert_close(step.mix_weights.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(step.noise.double(), slot_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.log_density.double(), slot_logp.sum(-1), rtol=1e-6, atol=1e-5)
    assert torch.equal(step.tokens, step.mix_ids[:, 0])  # slot 0 is the transcript token
    assert bool(step.support.all() & step.is_soft.all() & step.thinking.all())
    table = torch.randn(PADDED, 16, generator=torch.Generator().manual_seed(6))
    mixed = local_mixture(table, 0, PADDED, step.mix_ids[:, None], step.mix_weights[:, None])
    reference = (expected.unsqueeze(-1) * table.double()[step.mix_ids]).sum(1)
    torch.testing.assert_close(mixed[:, 0].double(), reference, rtol=1e-5, atol=1e-6)


def test_a_token_drawn_twice_counts_twice():
    """Two tokens, probabilities q and 1 - q: slots [a, b, a] weigh a as 2q / (2q + (1 - q))."""
    logits = torch.full((1, PADDED), -math.inf)
    logits[0, 3], logits[0, 9] = 1.0, 0.0  # p(3) = q = sigmoid(1)
    q = 1 / (1 + math.exp(-1.0))
    raw = torch.tensor([[0.1, 0.9, 0.2]])  # inverse CDF in id order: 3 below q, 9 above
    step = MultiplexSampler(Truncation(), 3).sample(logits, SHARD, raw)
    assert step.mix_ids.tolist() == [[3, 9, 3]]
    norm = 2 * q + (1 - q)
    assert step.mix_weights[0].tolist() == pytest.approx([q / norm, (1 - q) / norm, q / norm])


# ------------------------------------------------------------------ the phase machine


def test_thinking_ends_only_when_slot_0_is_the_marker(tokenizer):
    """Row 0 draws the marker in slot 1 only: it stays a soft step, the marker mixed in. Row 1
    draws it in slot 0: the step is the one-hot marker step, scored at the thinking temperature,
    and the row enters the answer phase."""
    marker, other = 19556, 2294  # "Hello" (one token), " done"
    settings = RolloutSettings(
        thinking_sampler=MultiplexSampler(Truncation(), 3),
        answer_sampler=DiscreteSampler(Truncation(), 3),
        thinking_temperature=1.0,
        think_end="Hello",
        max_new_tokens=4,
        eos_ids=frozenset({2}),
    )
    shard = VocabShard.whole(len(tokenizer), len(tokenizer))
    machine = PhaseMachine(tokenizer, shard, settings, "cpu")
    logits = torch.full((2, len(tokenizer)), -math.inf)
    logits[:, [marker, other]] = 0.0  # p = 1/2 each; the inverse CDF runs in id order
    below, above = 0.25, 0.75  # below 1/2: the lower id (" done"); above: "Hello"
    thinking = torch.tensor([[[below, above, below], [above, below, below]]])  # [step, row, K]
    tapes = NoiseTapes(thinking, answer=torch.full((1, 2), 0.5))
    state = machine.start(2, 2)
    step, scored = machine.step(logits, state, torch.tensor(0), tapes, torch.arange(2))
    assert step.mix_ids.tolist() == [[other, marker, other], [marker, 0, 0]]
    assert step.is_soft.tolist() == [True, False] and step.thinking.tolist() == [True, True]
    assert step.support.tolist() == [[True, True, True], [True, False, False]]
    assert step.log_density[1].item() == pytest.approx(math.log(0.5))
    assert state.phase.tolist() == [THINK, ANSWER] and scored.all()
    units = Scorer(None, per_slot=True).scored_units(
        scored[:, None], step.map(lambda t: t[:, None])
    )
    assert units[:, 0].tolist() == [[True, True, True], [True, False, False]]


# ------------------------------------------------------------------ scores and the update

VOCAB_MODEL = 1000  # tiny_models' real vocabulary


def multiplex_batch(seed: int, rows: int = 4, seq: int = 12) -> Batch:
    """Right-padded rows: a prompt, soft steps of K draws (some drawn twice), the one-hot marker
    step, then discrete answer steps."""
    g = torch.Generator().manual_seed(seed)
    records = MixtureRecord.discrete(torch.randint(0, VOCAB_MODEL, (rows, seq), generator=g), K)
    loss_mask = torch.zeros(rows, seq, dtype=torch.bool)
    for b in range(rows):
        prompt, length = 3 + b % 2, seq - b % 3
        marker = prompt + 3 + b % 2
        loss_mask[b, prompt:length] = True
        records.tokens[b, length:] = records.mix_ids[b, length:, 0] = 0  # right padding
        records.mix_weights[b, length:, 0] = records.support[b, length:, 0] = 0
        records.thinking[b, prompt : marker + 1] = True
        for j in range(prompt, marker):
            ids = torch.randint(0, VOCAB_MODEL, (K,), generator=g)
            if j % 2:
                ids[2] = ids[0]  # a token drawn twice
            records.mix_ids[b, j], records.tokens[b, j] = ids, ids[0]
            records.mix_weights[b, j] = torch.softmax(torch.randn(K, generator=g), -1)
            records.support[b, j], records.is_soft[b, j] = True, True
    advantages = torch.randn(rows, 1, generator=g) * loss_mask
    return Batch(records, loss_mask, advantages=advantages)


def reference_slot_logprobs(hf_model, batch: Batch) -> torch.Tensor:
    """[B, S, K] float64 with transformers: inputs sum_k w_k E[ids_k]; the output at j - 1 scores
    each scored slot of record j as log_softmax(l / T)[id], T the thinking temperature on thinking
    records (soft steps, the marker step), the answer temperature elsewhere."""
    records = batch.records
    logits = mixture_logits64(hf_model, records)
    out = torch.zeros(records.mix_ids.shape, dtype=torch.float64)
    for b, j in batch.loss_mask.nonzero().tolist():
        t = THINKING_T if records.thinking[b, j] else ANSWER_T
        log_p = torch.log_softmax(logits[b, j - 1] / t, -1)
        slots = K if records.is_soft[b, j] else 1
        out[b, j, :slots] = log_p[records.mix_ids[b, j, :slots]]
    return out


def test_slot_scores_match_transformers_in_float64(tmp_path):
    hf = make_hf_model("qwen2", tmp_path)
    batch = multiplex_batch(seed=1)
    worker = new_worker(recipe(tmp_path, micro=2, algorithm="multiplex"))
    logp = worker.compute_logprobs(batch)
    assert logp.shape == (*batch.loss_mask.shape, K)
    assert (logp.double() - reference_slot_logprobs(hf, batch)).abs().max() <= 1e-4
    units = worker.scorer.scored_units(batch.loss_mask, batch.records)
    assert (logp[~units] == 0).all() and int(units.sum()) > int(batch.loss_mask.sum())


def test_first_update_ratio_is_exactly_one_and_each_slot_counts(tmp_path):
    """At ratio 1 each slot's surrogate is -A: the loss sums a position's slots and divides by the
    positions (token mean per micro-batch), so a soft position weighs K answer tokens."""
    make_hf_model("qwen2", tmp_path)
    worker = new_worker(recipe(tmp_path, micro=2, kl=0.5, algorithm="multiplex"))
    batch = multiplex_batch(seed=2)
    batch.old_logp = worker.compute_logprobs(batch)
    batch.ref_logp = worker.compute_logprobs(batch, reference=True)
    result = worker.train_step(batch, worker.recipe_loss)
    assert result.updated and result.metrics["ratio/mean"] == 1.0
    assert result.metrics["kl/mean"] == 0.0
    mask, adv = batch.loss_mask, batch.advantages.double()
    slots = worker.scorer.scored_units(mask, batch.records).sum(-1).double()  # K or 1
    per_micro = [-(adv[i : i + 2] * slots[i : i + 2]).sum() / mask[i : i + 2].sum() for i in (0, 2)]
    assert result.metrics["loss"] == pytest.approx(float(sum(per_micro) / 2), abs=1e-6)


def test_per_slot_loss_and_gradient_match_the_closed_form():
    """The released code's loss on hand-made per-slot log-densities (float64): each slot its own
    ratio, clip-higher and dual clip; a position's slots summed, divided by the scored positions;
    icepop's rollout correction zeroes the one slot whose weight leaves [0.5, 2]."""
    cfg = LossCfg(
        ratio_clip_min=0.2,
        ratio_clip_max=0.28,
        ratio_clip_c=3.0,
        aggregation="token_mean_global",
        reference_policy_kl_penalty=0.0,
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="icepop",
        truncated_importance_sampling_ratio=2.0,
        truncated_importance_sampling_ratio_min=0.5,
    )
    g = torch.Generator().manual_seed(4)
    loss_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    support = torch.zeros(2, 5, K, dtype=torch.bool)
    support[..., 0] = True
    support[0, 1:3] = support[1, 1] = True  # soft steps: every slot scored
    units = loss_mask.unsqueeze(-1) & support
    old = torch.randn(2, 5, K, generator=g, dtype=torch.float64) - 2
    rollout = old.clone()
    rollout[0, 2, 1] += 1.0  # w = e^-1 < 0.5: icepop drops this slot only
    new = (old + 0.4 * torch.randn(old.shape, generator=g, dtype=torch.float64)) * units
    advantages = torch.tensor([[0.0, 1.5, 1.5, 1.5, 0.0], [0.0, -0.7, -0.7, 0.0, 0.0]])
    at = units.nonzero(as_tuple=True)
    step = StepShape(1, 1, int(loss_mask.sum()), int(units.sum()))
    objective = PolicyLoss(cfg).micro_batch(
        loss_mask, at, old, advantages.double(), None, step, rollout_logp=rollout
    )
    logp = new[at].clone().requires_grad_()
    value = objective(logp, None, slice(0, len(logp))).sum()
    (grad,) = torch.autograd.grad(value, logp)

    expected, expected_grad = 0.0, []
    for b, j, k in zip(*(i.tolist() for i in at)):
        a, r = float(advantages[b, j]), math.exp(float(new[b, j, k] - old[b, j, k]))
        w = math.exp(float(old[b, j, k] - rollout[b, j, k]))
        keep = 0.5 <= w <= 2.0
        clipped = min(max(r, 0.8), 1.28)
        # max(-A r, -A clip(r)): the ratio's gradient where the unclipped term binds (or ties)
        term, slope = (-a * r, -a) if -a * r >= -a * clipped else (-a * clipped, 0.0)
        if a < 0 and term > -a * 3.0:
            term, slope = -a * 3.0, 0.0
        n = int(loss_mask.sum())  # positions, not slots
        expected += keep * w * term / n
        expected_grad.append(keep * w * slope * r / n)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))
    assert objective.metrics["is_weight/truncated_fraction"] == 1  # one slot, counted once


def _first_step(rank, hf_dir, tp, pp):
    from builders import sharded_pieces

    worker = new_worker(recipe(hf_dir, tp, pp, micro=2, algorithm="multiplex"), tp, pp)
    batch = multiplex_batch(seed=3)
    batch.old_logp = worker.compute_logprobs(batch)
    batch.ref_logp = worker.compute_logprobs(batch, reference=True)
    # a later policy's view: the first update's ratios move off 1 for the clip to bind
    batch.old_logp = torch.where(batch.old_logp != 0, batch.old_logp + 0.3, 0.0)
    result = worker.train_step(batch, worker.recipe_loss)
    pieces = [(*p[:4], p[4].numpy()) for p in sharded_pieces(worker.model)]
    return result, batch.ref_logp.numpy(), pieces


@pytest.mark.multiproc
@pytest.mark.parametrize("kind,tp,pp", [("qwen2", 2, 1), ("llama", 1, 2)], ids=["tp2", "pp2"])
def test_one_step_on_two_ranks_matches_one_rank(kind, tp, pp, tmp_path):
    from builders import assemble

    make_hf_model(kind, tmp_path)
    expected_result, expected_logp, expected_pieces = _first_step(0, str(tmp_path), 1, 1)
    expected = assemble([expected_pieces])
    results = run_ranks(2, _first_step, str(tmp_path), tp, pp)
    got = assemble(pieces for _, _, pieces in results)
    assert 0 < expected_result.metrics["clip_fraction"] < 1
    for key in expected:
        assert (got[key] - expected[key]).abs().max() <= 1e-5, key
    for result, logp, _ in results:
        for name in ("loss", "ratio/mean", "clip_fraction", "kl/mean"):
            assert result.metrics[name] == pytest.approx(expected_result.metrics[name], abs=1e-5)
        assert result.metrics["grad_norm"] == pytest.approx(
            expected_result.metrics["grad_norm"], rel=1e-5
        )
        assert abs(torch.from_numpy(logp) - torch.from_numpy(expected_logp)).max() <= 1e-5
