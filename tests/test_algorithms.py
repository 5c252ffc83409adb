"""Advantages and the policy loss against hand-written float64 references (plain Python math)."""

import math
import statistics

import pytest
import torch

from megatron_softgrpo.algorithms.advantages import broadcast_to_positions, group_advantages
from megatron_softgrpo.algorithms.loss import (
    LossScale,
    PolicyLoss,
    StepShape,
    aggregate,
    aggregation_weights,
    k3_kl,
    policy_loss,
    token_terms,
)
from megatron_softgrpo.config.schema import LossCfg

F64 = torch.float64


# ---------------------------------------------------------------- references, written from the formulas


def ref_policy_term(logp, old, adv, lo, hi, c):
    """Textbook PPO-clip with dual clip, one position: returns (loss, low clip, high clip, dual clip)."""
    r = math.exp(logp - old)
    if adv >= 0:
        return -adv * min(r, 1 + hi), False, adv > 0 and r > 1 + hi, False
    bounded = max(r, 1 - lo)  # -A > 0: the pessimistic term takes the larger ratio
    dual = c is not None and bounded > c
    return -adv * (min(bounded, c) if c is not None else bounded), r < 1 - lo, False, dual


def ref_k3(logp, ref, clamp):
    d = ref - logp
    return min(max(math.exp(d) - d - 1, -clamp), clamp)


def ref_token_mean(values, mask):
    picked = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    return sum(picked) / len(picked) if picked else 0.0


def ref_seq_mean(values, mask):
    means = [
        sum(v for v, m in zip(row, mrow) if m) / sum(mrow)
        for row, mrow in zip(values, mask)
        if sum(mrow)
    ]
    return sum(means) / len(means) if means else 0.0


def t(rows):
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- advantages


def test_group_advantages_match_mean_and_unbiased_std():
    groups = [
        [1.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 1.0],
        [1.0, 1.0, 1.0, 1.0],
        [0.5, -2.0, 3.0, 0.25],
    ]
    rewards = t([r for g in groups for r in g])
    got = group_advantages(rewards, 4)
    want = [(r - statistics.mean(g)) / (statistics.stdev(g) + 1e-6) for g in groups for r in g]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[8:12].tolist() == [0.0] * 4  # all-equal group: no signal, no NaN
    centred = group_advantages(rewards, 4, normalize=False)
    assert centred.tolist() == pytest.approx(
        [r - statistics.mean(g) for g in groups for r in g], abs=1e-12
    )


def test_group_of_one_uses_zero_mean_and_unit_std_like_verl():
    assert group_advantages(t([1.0, 0.0]), 1).tolist() == pytest.approx([1 / (1 + 1e-6), 0.0])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(t([1.0, 0.0]), 3)


def test_broadcast_puts_each_advantage_on_its_generated_positions_only():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    out = broadcast_to_positions(t([2.0, -1.0, 5.0]), mask)
    assert out.tolist() == [[0, 2, 2, 0], [0, 0, -1, -1], [0, 0, 0, 0]]


# ---------------------------------------------------------------- the policy term


CFG_ASYM = LossCfg(
    ratio_clip_min=0.2, ratio_clip_max=0.28, ratio_clip_c=3.0, reference_policy_kl_penalty=0.0
)

# (ratio, advantage) chosen to land in every branch: inside, clipped high, clipped low, dual clip, A = 0
CASES = [
    (0.5, 1.0),
    (1.0, 1.0),
    (1.25, 1.0),
    (1.3, 1.0),
    (2.0, 0.7),  # A > 0: 1.25 is inside only because clip-high is 0.28
    (0.5, -1.0),
    (0.79, -1.0),
    (0.85, -1.0),
    (1.5, -0.5),
    (2.9, -1.0),
    (3.5, -1.0),
    (10.0, -2.0),  # A < 0
    (0.3, 0.0),
    (4.0, 0.0),
]


def _case_tensors(cases):
    old = t([[-1.0 - 0.1 * i for i in range(len(cases))]])
    logp = old + torch.log(t([[r for r, _ in cases]]))
    adv = t([[a for _, a in cases]])
    return logp, old, adv, torch.ones_like(adv, dtype=torch.bool)


@pytest.mark.parametrize("clip_c", [3.0, None])
def test_policy_term_matches_reference_in_every_branch(clip_c):
    cfg = CFG_ASYM.model_copy(update={"ratio_clip_c": clip_c})
    logp, old, adv, mask = _case_tensors(CASES)
    out = policy_loss(logp, old, adv, mask, cfg)
    ref = [
        ref_policy_term(lp, o, a, 0.2, 0.28, clip_c)
        for lp, o, a in zip(logp[0].tolist(), old[0].tolist(), adv[0].tolist())
    ]
    n = len(CASES)
    assert out.loss.item() == pytest.approx(sum(r[0] for r in ref) / n, rel=1e-12)
    assert out.policy_loss.item() == pytest.approx(out.loss.item(), rel=1e-12)
    m = out.metrics
    assert m["clip_fraction/low"].item() == pytest.approx(sum(r[1] for r in ref) / n)
    assert m["clip_fraction/high"].item() == pytest.approx(sum(r[2] for r in ref) / n)
    assert m["dual_clip_fraction"].item() == pytest.approx(sum(r[3] for r in ref) / n)
    assert m["ratio/mean"].item() == pytest.approx(sum(r for r, _ in CASES) / n, rel=1e-6)
    assert "kl/mean" not in m and "entropy/mean" not in m
    # the cases really exercise each branch
    assert (sum(r[1] for r in ref), sum(r[2] for r in ref), sum(r[3] for r in ref)) == (
        2,
        2,
        2 if clip_c else 0,
    )


def test_dual_clip_caps_negative_advantage_loss_at_c():
    logp, old, adv, mask = _case_tensors([(10.0, -2.0)])
    assert policy_loss(logp, old, adv, mask, CFG_ASYM).loss.item() == pytest.approx(2.0 * 3.0)
    no_dual = CFG_ASYM.model_copy(update={"ratio_clip_c": None})
    assert policy_loss(logp, old, adv, mask, no_dual).loss.item() == pytest.approx(2.0 * 10.0)


def test_clip_higher_is_asymmetric():
    # ratio 1.25 with A > 0 is clipped at eps_high 0.2 but not at 0.28; ratio 0.79 with A < 0 is clipped at eps_low 0.2
    logp, old, adv, mask = _case_tensors([(1.25, 1.0)])
    symmetric = CFG_ASYM.model_copy(update={"ratio_clip_max": 0.2})
    assert policy_loss(logp, old, adv, mask, symmetric).loss.item() == pytest.approx(-1.2)
    assert policy_loss(logp, old, adv, mask, CFG_ASYM).loss.item() == pytest.approx(-1.25)
    logp, old, adv, mask = _case_tensors([(0.79, -1.0)])
    assert policy_loss(logp, old, adv, mask, CFG_ASYM).loss.item() == pytest.approx(0.8)
    wide_low = CFG_ASYM.model_copy(update={"ratio_clip_min": 0.3})
    assert policy_loss(logp, old, adv, mask, wide_low).loss.item() == pytest.approx(0.79)


# ---------------------------------------------------------------- KL and entropy


def test_k3_kl_matches_formula_and_clamp():
    logp = t([[-1.0, -2.0, -0.5, -3.0, -1.0, -60.0]])
    ref = t([[-1.2, -1.0, -0.5, -0.1, -40.0, -1.0]])
    got = k3_kl(logp, ref, 10.0)
    want = [ref_k3(a, b, 10.0) for a, b in zip(logp[0].tolist(), ref[0].tolist())]
    assert got[0].tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert (
        got[0, 2].item() == 0.0 and got[0, 5].item() == 10.0
    )  # equal: exactly 0; far apart: the clamp
    assert (got >= 0).all()  # k3 is non-negative


def test_kl_term_value_and_finite_gradient_far_from_reference():
    logp = t([[-1.0, -2.0, -0.5, -100.0]]).requires_grad_()
    old = logp.detach().clone()
    ref = t(
        [[-1.2, -1.0, -0.5, -1.0]]
    )  # last position: exp(99) would overflow float32 without the +-20 guard
    adv = t([[0.5, -0.5, 1.0, 0.0]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    cfg = LossCfg(reference_policy_kl_penalty=0.1, kl_clamp=10.0)
    out = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref)
    kl = [ref_k3(a, b, 10.0) for a, b in zip(logp[0].tolist(), ref[0].tolist())]
    assert out.kl_loss.item() == pytest.approx(sum(kl) / 4, rel=1e-12)
    assert out.loss.item() == pytest.approx(
        -sum(adv[0].tolist()) / 4 + 0.1 * sum(kl) / 4, rel=1e-12
    )
    assert out.metrics["kl/mean"].item() == pytest.approx(sum(kl) / 4, rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 3].item() == pytest.approx(
        0.0
    )  # clamped KL, A = 0: nothing pulls this position
    f32 = policy_loss(
        logp.detach().float(), old.float(), adv.float(), mask, cfg, ref_logp=ref.float()
    )
    assert torch.isfinite(f32.loss)


def test_kl_penalty_zero_needs_no_reference_and_positive_needs_one():
    logp, old, adv, mask = _case_tensors([(1.0, 1.0)])
    out = policy_loss(logp, old, adv, mask, LossCfg(reference_policy_kl_penalty=0.0))
    assert out.kl_loss is None and "kl/mean" not in out.metrics
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, LossCfg(reference_policy_kl_penalty=0.001))


def test_entropy_term_is_subtracted_with_its_coefficient():
    logp, old, adv, mask = _case_tensors([(1.0, 1.0), (1.0, -1.0), (1.0, 0.5)])
    entropy = t([[0.3, 1.2, 2.1]]).requires_grad_()
    cfg = LossCfg(reference_policy_kl_penalty=0.0, entropy_coef=0.01)
    out = policy_loss(logp, old, adv, mask, cfg, entropy=entropy)
    assert out.entropy_loss.item() == pytest.approx(1.2)
    assert out.loss.item() == pytest.approx(-0.5 / 3 - 0.01 * 1.2)
    out.loss.backward()
    assert entropy.grad[0].tolist() == pytest.approx([-0.01 / 3] * 3)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old, adv, mask, cfg)
    metric_only = policy_loss(
        logp, old, adv, mask, LossCfg(reference_policy_kl_penalty=0.0), entropy=entropy
    )
    assert metric_only.loss.item() == pytest.approx(-0.5 / 3) and metric_only.metrics[
        "entropy/mean"
    ].item() == pytest.approx(1.2)


def test_first_update_ratio_exactly_one_and_kl_exactly_zero():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=gen) * 5  # float32, as the trainer computes them
    mask = torch.rand(4, 6, generator=gen) > 0.3
    adv = torch.randn(4, 1, generator=gen).expand(4, 6) * mask
    cfg = LossCfg(reference_policy_kl_penalty=0.001)
    out = policy_loss(logp, logp.clone(), adv, mask, cfg, ref_logp=logp.clone())
    assert out.metrics["ratio/mean"].item() == 1.0
    assert out.metrics["kl/mean"].item() == 0.0 and out.kl_loss.item() == 0.0
    assert torch.equal(k3_kl(logp, logp.clone(), 10.0), torch.zeros_like(logp))
    clipped = ["clip_fraction", "clip_fraction/low", "clip_fraction/high", "dual_clip_fraction"]
    assert [out.metrics[k].item() for k in clipped] == [0.0] * 4
    assert out.loss.item() == pytest.approx(-(adv[mask]).mean().item(), rel=1e-6)


# ---------------------------------------------------------------- aggregation


VALUES = [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [100.0, 200.0, 300.0, 400.0]]
MASK = [[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]  # a fully masked middle row


def test_aggregation_modes_against_hand_computation():
    values, mask = t(VALUES), torch.tensor(MASK, dtype=torch.bool)
    token_mean = ref_token_mean(VALUES, MASK)
    assert token_mean == (1 + 2 + 3 + 200) / 4
    assert aggregate(values, mask, "token_mean_microbatch").item() == pytest.approx(token_mean)
    assert aggregate(
        values, mask, "token_mean_microbatch", LossScale(num_micro_batches=4)
    ).item() == pytest.approx(token_mean / 4)
    glob = LossScale(global_num_tokens=16, data_parallel_size=2)
    assert aggregate(values, mask, "token_mean_global", glob).item() == pytest.approx(206 * 2 / 16)
    seq_mean = ref_seq_mean(VALUES, MASK)
    assert seq_mean == (2.0 + 200.0) / 2  # the fully masked row is not a sequence
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx(seq_mean)
    assert aggregate(
        values, mask, "seq_mean_token_mean", LossScale(num_micro_batches=2)
    ).item() == pytest.approx(seq_mean / 2)
    with pytest.raises(ValueError, match="global_num_tokens"):
        aggregate(values, mask, "token_mean_global")


def test_micro_batch_shares_add_up_to_the_mini_batch_objective():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(6, 5, generator=gen, dtype=F64)
    mask = torch.rand(6, 5, generator=gen) > 0.4
    mask[2] = False
    halves = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    glob = LossScale(global_num_tokens=int(mask.sum()))
    total_global = sum(aggregate(v, m, "token_mean_global", glob) for v, m in halves)
    assert total_global.item() == pytest.approx(values[mask].mean().item(), rel=1e-12)
    two = LossScale(num_micro_batches=2)
    total_mb = sum(aggregate(v, m, "token_mean_microbatch", two) for v, m in halves)
    assert total_mb.item() == pytest.approx(
        sum(v[m].mean().item() for v, m in halves) / 2, rel=1e-12
    )


@pytest.mark.parametrize(
    "mode", ["token_mean_microbatch", "token_mean_global", "seq_mean_token_mean"]
)
def test_fully_masked_rows_and_padding_garbage_give_no_nan(mode):
    # padding may hold anything: -inf, NaN, or finite log-probs with a NaN advantage
    logp = t([[-1.0, -0.5, float("-inf")], [-0.3, float("nan"), float("-inf")]]).requires_grad_()
    old = t([[-1.1, -0.4, float("-inf")], [-0.2, float("-inf"), 0.0]])
    adv = t([[1.0, 1.0, float("nan")], [float("nan"), 2.0, 3.0]])
    ref = t([[-1.0, -0.7, float("nan")], [float("-inf"), 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    scale = LossScale(global_num_tokens=2)
    cfg = LossCfg(aggregation=mode, reference_policy_kl_penalty=0.05)
    out = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref, scale=scale)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[1].tolist() == [0.0, 0.0, 0.0] and logp.grad[0, 2].item() == 0.0
    clean = policy_loss(
        logp.detach()[:1, :2],
        old[:1, :2],
        adv[:1, :2],
        mask[:1, :2],
        cfg,
        ref_logp=ref[:1, :2],
        scale=scale,
    )
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)

    empty = torch.zeros_like(mask)
    nothing = policy_loss(
        logp, old, adv, empty, cfg, ref_logp=ref, scale=LossScale(global_num_tokens=0)
    )
    assert nothing.loss.item() == 0.0 and nothing.metrics["ratio/mean"].item() == 0.0


# ---------------------------------------------------------------- gradient


@pytest.mark.parametrize(
    "mode", ["token_mean_microbatch", "token_mean_global", "seq_mean_token_mean"]
)
@pytest.mark.parametrize("num_micro, dp", [(2, 1), (1, 2)], ids=["2-micro", "2-ranks"])
def test_the_workers_loss_reports_what_policy_loss_computes(mode, num_micro, dp):
    """The loss as the policy worker takes it: two micro-batches of two rows (on one rank, or one on
    each of two ranks), each scored in two chunks. The objective it returns, as Megatron and DDP
    normalise it, and its metrics summed over both and reported equal `policy_loss` on the same rows."""
    logp, old, adv, ref, mask, entropy = _random_inputs(6)  # hits every clip
    logp, entropy = logp.detach(), entropy.detach()
    cfg = LossCfg(
        ratio_clip_c=3.0, reference_policy_kl_penalty=0.05, entropy_coef=0.01, aggregation=mode
    )
    loss = PolicyLoss(cfg)
    step = StepShape(num_micro, dp, int(mask.sum()))
    value, sums = 0.0, {}
    for rows in (slice(0, 2), slice(2, 4)):
        m = mask[rows]
        at = m.nonzero(as_tuple=True)
        micro = loss.micro_batch(m, at, old[rows], adv[rows], ref[rows], step)
        n = at[0].numel()
        for chunk in (slice(0, n // 2), slice(n // 2, n)):
            value += float(micro(logp[rows][at][chunk], entropy[rows][at][chunk], chunk).sum())
        for k, v in micro.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    reported = loss.report(sums, step)
    step_loss = value / (num_micro * dp)  # Megatron's division, DDP's average
    whole = policy_loss(
        logp,
        old,
        adv,
        mask,
        cfg,
        ref_logp=ref,
        entropy=entropy,
        scale=LossScale(global_num_tokens=int(mask.sum())),
    )
    if mode == "token_mean_global":
        want = float(whole.loss)
    else:  # the mean over micro-batches of each one's loss
        parts = [
            policy_loss(logp[r], old[r], adv[r], mask[r], cfg, ref_logp=ref[r], entropy=entropy[r])
            for r in (slice(0, 2), slice(2, 4))
        ]
        want = sum(float(p.loss) for p in parts) / 2
    assert step_loss == pytest.approx(want, abs=1e-6)
    assert reported["loss"] == pytest.approx(want, abs=1e-6)
    names = ["clip_fraction", "clip_fraction/low", "clip_fraction/high", "dual_clip_fraction"]
    names += ["ratio/mean", "kl/mean", "entropy/mean"]
    assert set(whole.metrics) == set(names) == set(reported) - {"loss", "policy_loss"}
    for name in names:
        assert reported[name] == pytest.approx(float(whole.metrics[name]), abs=1e-6), name
    both = float(whole.metrics["clip_fraction/low"] + whole.metrics["clip_fraction/high"])
    assert reported["clip_fraction"] == pytest.approx(both, abs=1e-6)
    assert reported.keys() == loss.zero_metrics("cpu").keys()
    assert (
        min(reported[k] for k in ("clip_fraction/low", "clip_fraction/high", "dual_clip_fraction"))
        > 0
    )


def test_the_workers_loss_names_only_the_terms_it_computes():
    assert set(PolicyLoss(LossCfg()).zero_metrics("cpu")) == {
        "loss",
        "policy_loss",
        "clip_fraction",
        "clip_fraction/low",
        "clip_fraction/high",
        "dual_clip_fraction",
        "ratio/mean",
        "kl/mean",
    }
    bare = PolicyLoss(LossCfg(reference_policy_kl_penalty=0, entropy_coef=0.1)).zero_metrics("cpu")
    assert "kl/mean" not in bare and "entropy/mean" in bare
    assert all(float(v) == 0.0 for v in bare.values())


def _random_inputs(seed):
    """Ratios kept >= 0.01 away from every clip boundary, so the loss is smooth where it is probed."""
    gen = torch.Generator().manual_seed(seed)
    b, s = 4, 7
    old = -torch.rand(b, s, generator=gen, dtype=F64) * 3
    ratio = torch.rand(b, s, generator=gen, dtype=F64) * 4 + 0.1
    for bound in (0.8, 1.28, 3.0):
        near = (ratio - bound).abs() < 0.01
        ratio[near] += 0.03
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.randn(b, 1, generator=gen, dtype=F64).expand(b, s).contiguous()
    ref = old + torch.randn(b, s, generator=gen, dtype=F64) * 0.5
    mask = torch.rand(b, s, generator=gen) > 0.3
    mask[1] = False
    entropy = (torch.rand(b, s, generator=gen, dtype=F64) * 2).requires_grad_()
    return logp, old, adv, ref, mask, entropy


@pytest.mark.parametrize(
    "mode", ["token_mean_microbatch", "token_mean_global", "seq_mean_token_mean"]
)
def test_gradient_matches_finite_differences(mode):
    logp, old, adv, ref, mask, entropy = _random_inputs(2)
    cfg = LossCfg(
        ratio_clip_min=0.2,
        ratio_clip_max=0.28,
        ratio_clip_c=3.0,
        reference_policy_kl_penalty=0.05,
        entropy_coef=0.01,
        aggregation=mode,
    )
    scale = LossScale(num_micro_batches=2, global_num_tokens=40, data_parallel_size=2)

    def f(lp, ent):
        return policy_loss(lp, old, adv, mask, cfg, ref_logp=ref, entropy=ent, scale=scale).loss

    assert torch.autograd.gradcheck(f, (logp, entropy), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradient_closed_form_token_mean():
    logp, old, adv, ref, mask, _ = _random_inputs(3)
    beta = 0.05
    cfg = LossCfg(
        ratio_clip_min=0.2, ratio_clip_max=0.28, ratio_clip_c=3.0, reference_policy_kl_penalty=beta
    )
    policy_loss(logp, old, adv, mask, cfg, ref_logp=ref).loss.backward()
    n = int(mask.sum())
    want = torch.zeros_like(old)
    for i, j in mask.nonzero().tolist():
        lp, o, a, rf = logp[i, j].item(), old[i, j].item(), adv[i, j].item(), ref[i, j].item()
        r = math.exp(lp - o)
        # the surrogate moves with r only where the unclipped ratio is the active branch
        active = (a > 0 and r < 1.28) or (a < 0 and 0.8 < r < 3.0)
        d_policy = -a * r if active else 0.0
        d_kl = 1 - math.exp(rf - lp) if abs(ref_k3(lp, rf, 10.0)) < 10 else 0.0
        want[i, j] = (d_policy + beta * d_kl) / n
    assert torch.allclose(logp.grad, want, rtol=1e-10, atol=1e-14)


def test_only_logp_and_entropy_receive_gradient():
    logp, old, adv, ref, mask, entropy = _random_inputs(4)
    old, adv, ref = (x.clone().requires_grad_() for x in (old, adv, ref))
    cfg = LossCfg(reference_policy_kl_penalty=0.05, entropy_coef=0.01)
    policy_loss(logp, old, adv, mask, cfg, ref_logp=ref, entropy=entropy).loss.backward()
    assert old.grad is None and adv.grad is None and ref.grad is None
    assert logp.grad.abs().sum() > 0 and entropy.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mode", ["token_mean_microbatch", "token_mean_global", "seq_mean_token_mean"]
)
def test_weighted_token_objective_on_scored_positions_equals_the_policy_loss(mode):
    """The trainer's fused form: per-position objective x aggregation weight, summed over the scored
    positions only ([n], as the chunked scorer hands them over), is the loss with the same gradient."""
    logp, old, adv, ref, mask, entropy = _random_inputs(5)
    cfg = LossCfg(
        ratio_clip_min=0.2,
        ratio_clip_max=0.28,
        ratio_clip_c=3.0,
        reference_policy_kl_penalty=0.05,
        entropy_coef=0.01,
        aggregation=mode,
    )
    scale = LossScale(num_micro_batches=2, global_num_tokens=40, data_parallel_size=2)
    want = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref, entropy=entropy, scale=scale).loss
    want_grads = torch.autograd.grad(want, (logp, entropy))

    at = mask.nonzero(as_tuple=True)
    weights = aggregation_weights(mask, mode, scale)[at]
    flat = [x.detach()[at] for x in (logp, old, adv, ref, entropy)]
    flat[0].requires_grad_(), flat[4].requires_grad_()
    terms = token_terms(
        flat[0],
        flat[1],
        flat[2],
        torch.ones_like(weights, dtype=torch.bool),
        cfg,
        ref_logp=flat[3],
        entropy=flat[4],
    )
    got = (weights * terms.objective(cfg)).sum()
    got_grads = torch.autograd.grad(got, (flat[0], flat[4]))
    assert abs(float(got.detach() - want.detach())) <= 1e-12 * max(1.0, abs(float(want.detach())))
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w[at], rtol=1e-10, atol=1e-15)
        assert float(w[~mask].abs().sum()) == 0.0
    assert bool(terms.ratio_bound.any()) and bool(
        terms.kl.abs().sum() > 0
    )  # the branches are exercised
