"""The rollout correction (tis, icepop, seq-mask-tis), CISPO and Dr. GRPO's aggregation against
float64 closed forms written here from their definitions (plain Python math, position by position),
on a hand-made batch of soft and discrete steps, a marker step and padding; the worker's metric
reductions (sum, min, max); `check`'s refusals; TP=2 and DP=2 against one rank; and two training
steps of the embedded model with every option on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import make_batch, new_worker, recipe, with_old_logprobs, write_recipe
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.algorithms.loss import (
    PolicyLoss,
    StepShape,
    metric_reduction,
    policy_loss,
    rollout_correction,
)
from megatron_softgrpo.cli import main
from megatron_softgrpo.config.schema import LossCfg, PolicyCfg, RecipeCfg
from megatron_softgrpo.train.metrics_log import OPTIONAL_KEYS

ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPE = ROOT / "recipes" / "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml"
F64 = torch.float64
B, S = 3, 9

# ---------------------------------------------------------------- the hand-made batch
#
# row 0: prompt 0-1, soft 2-4, the marker step 5 (discrete, drawn by the thinking sampler), discrete
#        6-7, padding 8;  row 1: prompt 0-2, soft 3-5, padding 6-8;  row 2: prompt 0, soft 1-3,
#        marker 4, discrete 5-8. Per scored position: old log-density, logp - old (the ratio r),
#        old - rollout (the rollout correction's log-weight d).
SCORED = {
    0: [
        (2, True, -1.4, 0.10, 0.03),
        (3, True, -1.1, -0.35, 1.00),  # w = e > 2: clamped by tis, zeroed by icepop
        (4, True, -2.3, 0.50, -0.02),
        (5, False, -0.7, 0.02, 0.01),  # the marker step
        (6, False, -0.2, -0.15, -0.03),
        (7, False, -1.9, 0.30, 0.02),
    ],
    1: [  # w = e^0.4 everywhere: inside [0.5, 2], but the geometric mean is above 1.25
        (3, True, -1.2, 0.25, 0.40),
        (4, True, -1.6, -0.10, 0.40),
        (5, True, -1.05, -0.40, 0.40),
    ],
    2: [
        (1, True, -1.3, 0.05, 0.02),
        (2, True, -2.1, 0.40, -0.01),
        (3, True, -1.7, -0.30, 0.03),
        (4, False, -0.05, 0.12, -0.02),  # the marker step
        (5, False, -0.9, -0.05, 0.01),
        (6, False, -2.6, 1.20, -1.00),  # w = 1/e < 0.5; r > 3 with A < 0: the dual clip
        (7, False, -0.4, -0.60, 0.02),  # r < 0.8 with A < 0: the low clip
        (8, False, -1.1, 0.15, -0.03),
    ],
}
ADVANTAGE = {0: 0.8, 1: 0.6, 2: -0.9}
POSITIONS = [(b, p) for b, rows in SCORED.items() for p in rows]  # (row, (j, soft, old, dr, d))


def batch(identical: bool = False):
    """(logp [requires grad], old, advantages, mask, rollout_logp, is_soft), float64 [B, S];
    padding holds values no arithmetic may read (rollout -inf, logp nan)."""
    logp = torch.full((B, S), math.nan, dtype=F64)
    old = torch.zeros(B, S, dtype=F64)
    rollout = torch.full((B, S), -math.inf, dtype=F64)
    adv = torch.zeros(B, S, dtype=F64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    soft = torch.zeros(B, S, dtype=torch.bool)
    for b, (j, is_soft, o, dr, d) in POSITIONS:
        old[b, j], logp[b, j], rollout[b, j] = o, o + dr, o if identical else o - d
        adv[b, j], mask[b, j], soft[b, j] = ADVANTAGE[b], True, is_soft
    prompt = ~mask & (torch.arange(S) < torch.tensor([2, 3, 1]).unsqueeze(1))
    logp[prompt], rollout[prompt] = -0.5, -0.5  # prompt tokens: finite, never scored
    return logp.requires_grad_(), old, adv, mask, rollout, soft


# ---------------------------------------------------------------- closed forms


def ref_weights(kind, lo, hi, identical=False):
    """{(b, j): (weight, raw w, truncated)} from the definitions."""
    out = {}
    for b, rows in SCORED.items():
        ds = [0.0 if identical else d for (_, _, _, _, d) in rows]
        geo_mean = math.exp(sum(ds) / len(ds))
        row_out = not lo <= geo_mean <= hi if kind == "seq-mask-tis" else False
        for (j, *_), d in zip(rows, ds):
            w = math.exp(d)
            if kind is None:
                out[b, j] = (w, w, False)
            elif kind == "tis":
                out[b, j] = (min(max(w, lo), hi), w, not lo <= w <= hi)
            elif kind == "icepop":
                out[b, j] = (w if lo <= w <= hi else 0.0, w, not lo <= w <= hi)
            else:
                out[b, j] = (0.0 if row_out else w, w, row_out)
    return out


def ref_term(r, a, lo=0.2, hi=0.2, c=3.0, cispo=False, logp=None):
    """(policy term, d term / d logp) of one position: PPO-clip with dual clip, or CISPO."""
    if cispo:
        w = min(max(r, 1 - lo), 1 + hi)
        return -a * w * logp, -a * w
    unclipped, clipped = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
    term, grad = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
    if c is not None and a < 0 and term > -a * c:
        term, grad = -a * c, 0.0
    return term, grad


def ref_metrics(weights):
    """The correction's metrics over all, soft and discrete scored positions."""
    out = {}
    for kind, keep in (("", lambda s: True), ("/soft", bool), ("/discrete", lambda s: not s)):
        picked = [(b, j, d) for b, (j, s, _, _, d) in POSITIONS if keep(s)]
        raw = [weights[b, j][1] for b, j, _ in picked]
        out[f"is_weight{kind}/mean"] = sum(raw) / len(raw)
        out[f"is_weight{kind}/min"] = min(raw)
        out[f"is_weight{kind}/max"] = max(raw)
        out[f"is_weight{kind}/truncated_fraction"] = sum(
            weights[b, j][2] for b, j, _ in picked
        ) / len(picked)
        out[f"gen_kl{kind}"] = sum(math.exp(w) - w - 1 for w in (math.log(x) for x in raw)) / len(
            raw
        )
    return out


def ref_loss(weights, cispo=False, c=3.0):
    """token_mean_microbatch over the 17 scored positions: (loss, gradient {(b, j): value})."""
    n = len(POSITIONS)
    loss, grad = 0.0, {}
    for b, (j, _, o, dr, _) in POSITIONS:
        term, g = ref_term(math.exp(dr), ADVANTAGE[b], c=c, cispo=cispo, logp=o + dr)
        loss += weights[b, j][0] * term / n
        grad[b, j] = weights[b, j][0] * g / n
    return loss, grad


def assert_gradient(logp, grad):
    want = torch.zeros(B, S, dtype=F64)
    for (b, j), g in grad.items():
        want[b, j] = g
    assert torch.allclose(logp.grad, want, rtol=1e-12, atol=1e-15)


def corrected(kind=None, lo=0.0, hi=None, **loss):
    return LossCfg(
        reference_policy_kl_penalty=0.0,
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type=kind or "tis",
        truncated_importance_sampling_ratio=hi,
        truncated_importance_sampling_ratio_min=lo,
        **loss,
    )


TRUNCATIONS = [
    (None, 0.0, None),
    ("tis", 0.5, 2.0),
    ("icepop", 0.5, 2.0),
    ("seq-mask-tis", 0.8, 1.25),
]
TRUNCATION_IDS = ["untruncated", "tis", "icepop", "seq-mask-tis"]


# ---------------------------------------------------------------- the loss on [B, S]


@pytest.mark.parametrize("kind,lo,hi", TRUNCATIONS, ids=TRUNCATION_IDS)
def test_identical_rollout_and_trainer_numerics_give_weight_one_and_the_plain_loss(kind, lo, hi):
    logp, old, adv, mask, rollout, soft = batch(identical=True)
    cfg = corrected(kind, lo, hi, ratio_clip_c=3.0)
    out = policy_loss(logp, old, adv, mask, cfg, rollout_logp=rollout, is_soft=soft)
    out.loss.backward()
    grad, logp.grad = logp.grad, None
    plain = policy_loss(logp, old, adv, mask, LossCfg(reference_policy_kl_penalty=0.0))
    plain.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(plain.loss.detach()), rel=1e-15)
    assert torch.allclose(grad, logp.grad, rtol=1e-15, atol=0)
    for part in ("", "/soft", "/discrete"):
        assert float(out.metrics[f"is_weight{part}/mean"]) == 1.0
        assert float(out.metrics[f"is_weight{part}/min"]) == 1.0
        assert float(out.metrics[f"is_weight{part}/max"]) == 1.0
        assert float(out.metrics[f"is_weight{part}/truncated_fraction"]) == 0.0
        assert float(out.metrics[f"gen_kl{part}"]) == 0.0
    weights = rollout_correction(old, rollout, mask, cfg)
    assert torch.equal(weights.weight, mask.double())  # 1 on scored positions, 0 elsewhere


@pytest.mark.parametrize("kind,lo,hi", TRUNCATIONS, ids=TRUNCATION_IDS)
def test_a_perturbed_rollout_is_truncated_as_the_closed_form_says(kind, lo, hi):
    logp, old, adv, mask, rollout, soft = batch()
    cfg = corrected(kind, lo, hi, ratio_clip_c=3.0)
    out = policy_loss(logp, old, adv, mask, cfg, rollout_logp=rollout, is_soft=soft)
    out.loss.backward()
    weights = ref_weights(kind, lo, hi)
    # the perturbation does what it was built for: exactly these positions are truncated
    truncated = {key for key, (_, _, t) in weights.items() if t}
    expected = {
        None: set(),
        "tis": {(0, 3), (2, 6)},
        "icepop": {(0, 3), (2, 6)},
        "seq-mask-tis": {(1, 3), (1, 4), (1, 5)},
    }[kind]
    assert truncated == expected
    got = rollout_correction(old, rollout, mask, cfg)
    assert {tuple(x) for x in got.truncated.nonzero().tolist()} == expected
    for (b, j), (w, raw, _) in weights.items():
        assert float(got.weight[b, j]) == pytest.approx(w, rel=1e-14)
        assert float(got.raw[b, j]) == pytest.approx(raw, rel=1e-14)
    assert float(got.weight[~mask].abs().sum()) == 0.0

    loss, grad = ref_loss(weights)
    assert float(out.loss) == pytest.approx(loss, rel=1e-12)
    assert_gradient(logp, grad)
    for name, value in ref_metrics(weights).items():
        assert float(out.metrics[name]) == pytest.approx(value, rel=1e-12, abs=1e-15), name
    # the correction changed the loss: the closed form without weights differs
    assert abs(loss - ref_loss(ref_weights(None, 0, None, identical=True))[0]) > 1e-3


def test_the_correction_weights_the_policy_term_only():
    """The KL and entropy terms are not importance-weighted (NeMo-RL's choice)."""
    logp, old, adv, mask, rollout, soft = batch()
    ref = old + 0.3
    entropy = torch.full((B, S), 0.7, dtype=F64)
    kw = dict(ref_logp=ref, entropy=entropy, rollout_logp=rollout, is_soft=soft)
    extra = dict(reference_policy_kl_penalty=0.05, entropy_coef=0.01)
    out = policy_loss(
        logp, old, adv, mask, LossCfg(use_importance_sampling_correction=True, **extra), **kw
    )
    plain = policy_loss(logp, old, adv, mask, LossCfg(**extra), ref_logp=ref, entropy=entropy)
    assert float(out.kl_loss) == pytest.approx(float(plain.kl_loss), rel=1e-15)
    assert float(out.entropy_loss) == pytest.approx(float(plain.entropy_loss), rel=1e-15)
    assert float(out.policy_loss) == pytest.approx(
        ref_loss(ref_weights(None, 0, None))[0], rel=1e-12
    )


def test_the_correction_needs_the_rollout_logp():
    logp, old, adv, mask, _, _ = batch()
    with pytest.raises(ValueError, match="use_importance_sampling_correction needs the rollout"):
        policy_loss(logp, old, adv, mask, corrected())


@pytest.mark.parametrize("kind,lo,hi", TRUNCATIONS[:2], ids=TRUNCATION_IDS[:2])
def test_cispo_weights_every_log_density_gradient_by_the_clipped_ratio(kind, lo, hi):
    logp, old, adv, mask, rollout, soft = batch()
    cfg = corrected(kind, lo, hi, use_cispo=True, ratio_clip_c=None)
    out = policy_loss(logp, old, adv, mask, cfg, rollout_logp=rollout, is_soft=soft)
    out.loss.backward()
    weights = ref_weights(kind, lo, hi)
    loss, grad = ref_loss(weights, cispo=True)
    assert float(out.loss) == pytest.approx(loss, rel=1e-12)
    assert_gradient(logp, grad)
    # unlike the clipped surrogate, a clipped position keeps its gradient
    clipped = [(b, j) for b, (j, _, _, dr, _) in POSITIONS if not 0.8 <= math.exp(dr) <= 1.2]
    assert len(clipped) == 9 and all(grad[p] != 0 for p in clipped)
    n, a = len(POSITIONS), ADVANTAGE
    low = sum(math.exp(dr) < 0.8 for _, (_, _, _, dr, _) in POSITIONS)
    high = sum(math.exp(dr) > 1.2 for _, (_, _, _, dr, _) in POSITIONS)
    assert (low, high) == (4, 5) and all(a.values())
    assert float(out.metrics["clip_fraction/low"]) == pytest.approx(low / n)
    assert float(out.metrics["clip_fraction/high"]) == pytest.approx(high / n)
    assert float(out.metrics["clip_fraction"]) == pytest.approx(9 / n)
    assert float(out.metrics["dual_clip_fraction"]) == 0.0


def test_dr_grpo_divides_each_response_sum_by_the_generation_limit():
    logp, old, adv, mask, _, _ = batch()
    limit = 16
    cfg = LossCfg(
        reference_policy_kl_penalty=0.0,
        aggregation="seq_mean_token_sum_norm",
        loss_scale_factor=limit,
    )
    out = policy_loss(logp, old, adv, mask, cfg)
    out.loss.backward()
    per_row = {b: 0.0 for b in SCORED}
    grad = {}
    for b, (j, _, _, dr, _) in POSITIONS:
        term, g = ref_term(math.exp(dr), ADVANTAGE[b])
        per_row[b] += term / limit
        grad[b, j] = g / limit / len(SCORED)
    assert float(out.loss) == pytest.approx(sum(per_row.values()) / len(SCORED), rel=1e-12)
    assert_gradient(logp, grad)
    # the per-length mean weighs a long response's positions less; the constant does not
    seq_mean = policy_loss(
        logp,
        old,
        adv,
        mask,
        LossCfg(aggregation="seq_mean_token_mean", reference_policy_kl_penalty=0.0),
    )
    assert abs(float(seq_mean.loss) - float(out.loss)) > 1e-3


def test_dr_grpo_divisor_defaults_to_the_generation_limit():
    def loss_of(**loss_fn):
        return RecipeCfg.model_validate(
            {
                "policy": {"model_name": "m", "generation": {"max_new_tokens": 77}},
                "loss_fn": loss_fn,
            }
        ).loss_fn

    assert loss_of(aggregation="seq_mean_token_sum_norm").loss_scale_factor == 77
    assert (
        loss_of(aggregation="seq_mean_token_sum_norm", loss_scale_factor=5).loss_scale_factor == 5
    )
    assert loss_of().loss_scale_factor is None  # other aggregations do not read it
    shared = LossCfg(aggregation="seq_mean_token_sum_norm")
    RecipeCfg(policy=PolicyCfg(model_name="m"), loss_fn=shared)
    assert shared.loss_scale_factor is None  # the LossCfg handed in is not changed
    with pytest.raises(ValueError, match="needs loss_fn.loss_scale_factor"):
        PolicyLoss(shared)


@pytest.mark.parametrize("c", [3.0, None], ids=["dual-clip", "no-dual-clip"])
def test_gspo_takes_one_clipped_ratio_per_response(c):
    """s_b = exp(mean over response b of (logp - old)), soft and discrete positions alike; the term
    max(-A s_b, -A clip(s_b)) (and the dual clip) per response, averaged over the responses; its
    gradient -A s_b / |b| on every position of an unclipped response, 0 on a clipped one."""
    logp, old, adv, mask, _, _ = batch()
    # log-ratios tripled, so that response 0 is clipped (s > 1.2, A > 0) and the others are not
    logp = (old + 3 * (logp.detach() - old)).requires_grad_()
    cfg = LossCfg(
        reference_policy_kl_penalty=0.0,
        aggregation="seq_mean_token_mean",
        sequence_level_importance_ratios=True,
        ratio_clip_c=c,
    )
    out = policy_loss(logp, old, adv, mask, cfg)
    out.loss.backward()
    loss, grad, ratios = 0.0, {}, []
    for b, rows in SCORED.items():
        s_b = math.exp(sum(3 * dr for (_, _, _, dr, _) in rows) / len(rows))
        term, g = ref_term(s_b, ADVANTAGE[b], c=c)  # g: d term / d log s_b
        loss += term / len(SCORED)
        for j, *_ in rows:
            grad[b, j] = g / len(rows) / len(SCORED)
        ratios += [s_b] * len(rows)
    assert float(out.loss) == pytest.approx(loss, rel=1e-12)
    assert_gradient(logp, grad)
    assert float(out.metrics["ratio/mean"]) == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)
    assert all(grad[0, j] == 0 for j, *_ in SCORED[0]) and all(g != 0 for g in grad.values() if g)
    assert sum(g != 0 for g in grad.values()) == len(SCORED[1]) + len(SCORED[2])


def test_gspo_is_not_a_sum_of_per_position_terms():
    """The worker's fused chunked pass needs an objective it can sum chunk by chunk; GSPO's ratio
    reads a whole response, so the loss says so and the worker takes the other path."""
    gspo = LossCfg(aggregation="seq_mean_token_mean", sequence_level_importance_ratios=True)
    assert PolicyLoss(LossCfg()).per_position and not PolicyLoss(gspo).per_position


# ---------------------------------------------------------------- the loss as the worker takes it


def worker_report(cfg: LossCfg, micro_rows, data, num_chunks=2):
    """The policy worker's use of the loss on one rank: micro-batches of whole rows, each scored in
    chunks, metrics reduced by name (sum, min, max) and reported. Returns (step loss, report)."""
    logp, old, adv, mask, rollout, soft = data
    loss = PolicyLoss(cfg)
    num_chunks = num_chunks if loss.per_position else 1  # GSPO: every position at once
    step = StepShape(len(micro_rows), 1, int(mask.sum()))
    value, reduced = 0.0, None
    for rows in micro_rows:
        m = mask[rows]
        at = m.nonzero(as_tuple=True)
        micro = loss.micro_batch(
            m, at, old[rows], adv[rows], None, step, rollout_logp=rollout[rows], is_soft=soft[rows]
        )
        n = at[0].numel()
        bounds = [n * i // num_chunks for i in range(num_chunks + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            chunk = slice(start, stop)
            value += float(micro(logp.detach()[rows][at][chunk], None, chunk).sum())
        metrics = {k: float(v) for k, v in micro.metrics.items()}
        if reduced is None:
            reduced = metrics
            continue
        combine = {"sum": lambda x, y: x + y, "min": min, "max": max}
        reduced = {k: combine[metric_reduction(k)](reduced[k], metrics[k]) for k in reduced}
    assert reduced.keys() == loss.zero_metrics("cpu").keys()
    return value / len(micro_rows), loss.report(reduced, step)


COMBINATIONS = [
    dict(
        truncated_importance_sampling_type="seq-mask-tis",
        truncated_importance_sampling_ratio=1.25,
        truncated_importance_sampling_ratio_min=0.8,
    ),
    dict(
        truncated_importance_sampling_type="icepop",
        truncated_importance_sampling_ratio=2.0,
        truncated_importance_sampling_ratio_min=0.5,
        use_cispo=True,
        ratio_clip_c=None,
    ),
    dict(
        truncated_importance_sampling_ratio=2.0,
        aggregation="seq_mean_token_sum_norm",
        loss_scale_factor=16,
    ),
    dict(
        truncated_importance_sampling_ratio=2.0,
        aggregation="seq_mean_token_mean",
        sequence_level_importance_ratios=True,
    ),
]


@pytest.mark.parametrize(
    "options", COMBINATIONS, ids=["seq-mask-tis", "icepop+cispo", "tis+dr-grpo", "tis+gspo"]
)
def test_the_workers_loss_reports_what_policy_loss_computes(options):
    data = batch()
    cfg = LossCfg(
        reference_policy_kl_penalty=0.0, use_importance_sampling_correction=True, **options
    )
    micro_rows = [slice(0, 2), slice(2, 3)]
    value, reported = worker_report(cfg, micro_rows, data)
    logp, old, adv, mask, rollout, soft = data
    kw = dict(rollout_logp=rollout, is_soft=soft)
    parts = [
        policy_loss(logp[r], old[r], adv[r], mask[r], cfg, **{k: v[r] for k, v in kw.items()})
        for r in micro_rows
    ]
    want = sum(float(p.loss) for p in parts) / len(parts)
    # the worker's aggregation weights are fp32: terms of ~0.5 summing to ~0.01 lose a few ulps
    assert value == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert reported["loss"] == pytest.approx(want, rel=1e-6, abs=1e-7)
    whole = policy_loss(logp, old, adv, mask, cfg, **kw)
    assert set(reported) - {"loss", "policy_loss"} == set(whole.metrics)
    for name, metric in whole.metrics.items():  # min and max included: reduced by name
        assert reported[name] == pytest.approx(float(metric), rel=1e-6, abs=1e-12), name
    assert reported["is_weight/min"] < 0.4 and reported["is_weight/max"] > 2.7


def test_the_documented_metrics_are_the_ones_the_loss_reports():
    logp, old, adv, mask, rollout, soft = batch()
    out = policy_loss(logp, old, adv, mask, corrected(), rollout_logp=rollout, is_soft=soft)
    plain = policy_loss(logp, old, adv, mask, LossCfg(reference_policy_kl_penalty=0.0))
    added = set(out.metrics) - set(plain.metrics)
    assert added == set(OPTIONAL_KEYS["loss_fn.use_importance_sampling_correction"])


def test_a_micro_batch_without_soft_steps_reports_no_soft_minimum():
    """A min or max over no position is the reduction's identity, reported as NaN (null)."""
    logp, old, adv, mask, rollout, soft = batch()
    data = (logp, old, adv, mask, rollout, torch.zeros_like(soft))
    _, reported = worker_report(
        LossCfg(use_importance_sampling_correction=True, reference_policy_kl_penalty=0.0),
        [slice(0, 3)],
        data,
    )
    assert math.isnan(reported["is_weight/soft/min"]) and math.isnan(reported["is_weight/soft/max"])
    assert reported["is_weight/soft/mean"] == 0.0 and "positions/soft" not in reported
    assert reported["is_weight/discrete/min"] == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_the_worker_reduces_each_metric_as_its_name_says():
    """PolicyWorker._reduce_metrics on one rank: sums, minima and maxima over micro-batches."""
    from megatron_softgrpo.train.policy import PolicyWorker

    parallel = SimpleNamespace(pp=1, dp=1)
    micro = [
        {
            "a": torch.tensor(1.0, dtype=F64),
            "w/min": torch.tensor(0.5, dtype=F64),
            "w/max": torch.tensor(2.0, dtype=F64),
        },
        {
            "a": torch.tensor(2.5, dtype=F64),
            "w/min": torch.tensor(0.25, dtype=F64),
            "w/max": torch.tensor(-math.inf, dtype=F64),
        },
    ]
    zeros = {
        "a": torch.tensor(0.0, dtype=F64),
        "w/min": torch.tensor(math.inf, dtype=F64),
        "w/max": torch.tensor(-math.inf, dtype=F64),
    }
    worker = SimpleNamespace(parallel=parallel)
    got = PolicyWorker._reduce_metrics(
        worker, [{"metrics": m} for m in micro], zeros, metric_reduction
    )
    assert got == {"a": 3.5, "w/min": 0.25, "w/max": 2.0}
    assert PolicyWorker._reduce_metrics(worker, [], zeros, metric_reduction) == {
        "a": 0.0,
        "w/min": math.inf,
        "w/max": -math.inf,
    }


# ---------------------------------------------------------------- check


def run_check(capsys, *overrides):
    code = main(["check", str(GPU_RECIPE), *overrides])
    return code, capsys.readouterr().err.strip()


ON = "loss_fn.use_importance_sampling_correction=true"
GSPO = "loss_fn.sequence_level_importance_ratios=true"
SEQ_MEAN = "loss_fn.aggregation=seq_mean_token_mean"
REFUSALS = [
    (
        [ON, "loss_fn.truncated_importance_sampling_type=clip"],
        ["loss_fn.truncated_importance_sampling_type=clip", "'tis'", "'icepop'", "'seq-mask-tis'"],
    ),
    (
        [
            ON,
            "loss_fn.truncated_importance_sampling_ratio=2",
            "loss_fn.truncated_importance_sampling_ratio_min=3",
        ],
        [
            "loss_fn.truncated_importance_sampling_ratio_min=3: exceeds loss_fn.truncated_importance_sampling_ratio=2"
        ],
    ),
    (
        [ON, "loss_fn.truncated_importance_sampling_ratio=0.9"],
        ["loss_fn.truncated_importance_sampling_ratio=0.9", "must contain 1"],
    ),
    (
        [
            ON,
            "loss_fn.truncated_importance_sampling_ratio=2",
            "loss_fn.truncated_importance_sampling_ratio_min=1.5",
        ],
        ["loss_fn.truncated_importance_sampling_ratio_min=1.5", "must contain 1"],
    ),
    (
        ["loss_fn.truncated_importance_sampling_ratio=2"],
        [
            "loss_fn.truncated_importance_sampling_ratio=2",
            "the rollout correction, which is off",
            "loss_fn.use_importance_sampling_correction=true",
        ],
    ),
    (
        [ON, "loss_fn.truncated_importance_sampling_type=icepop"],
        [
            "loss_fn.truncated_importance_sampling_type=icepop",
            "loss_fn.truncated_importance_sampling_ratio set",
        ],
    ),
    (
        [ON, "loss_fn.truncated_importance_sampling_ratio_min=0.5"],
        [
            "loss_fn.truncated_importance_sampling_ratio_min=0.5",
            "loss_fn.truncated_importance_sampling_ratio set",
        ],
    ),
    (
        ["loss_fn.use_cispo=true"],
        ["loss_fn.ratio_clip_c=3.0", "loss_fn.use_cispo=true", "set null"],
    ),
    (
        ["loss_fn.loss_scale_factor=100"],
        ["loss_fn.loss_scale_factor=100", "loss_fn.aggregation=seq_mean_token_sum_norm"],
    ),
    (
        ["loss_fn.aggregation=seq_mean_token_sum"],
        ["loss_fn.aggregation=seq_mean_token_sum", "'seq_mean_token_sum_norm'"],
    ),
    (
        [GSPO],
        ["loss_fn.aggregation=token_mean_microbatch", "GSPO", "seq_mean_token_mean"],
    ),
    (
        [GSPO, SEQ_MEAN, "loss_fn.use_cispo=true", "loss_fn.ratio_clip_c=null"],
        ["loss_fn.sequence_level_importance_ratios=true", "loss_fn.use_cispo"],
    ),
]


@pytest.mark.parametrize(
    "overrides,expected",
    REFUSALS,
    ids=[
        "unknown-type",
        "min-above-max",
        "max-below-1",
        "min-above-1",
        "correction-off",
        "type-without-ratio",
        "min-without-ratio",
        "cispo-dual-clip",
        "scale-without-dr-grpo",
        "unknown-aggregation",
        "gspo-token-mean",
        "gspo-cispo",
    ],
)
def test_check_refuses_what_the_loss_cannot_honour_in_one_line_naming_the_keys(
    overrides, expected, capsys
):
    code, err = run_check(capsys, *overrides)
    assert code == 2 and "\n" not in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, err


ACCEPTED = [
    [ON],
    [ON, "loss_fn.truncated_importance_sampling_ratio=2"],
    [
        ON,
        "loss_fn.truncated_importance_sampling_type=icepop",
        "loss_fn.truncated_importance_sampling_ratio=5",
        "loss_fn.truncated_importance_sampling_ratio_min=0.5",
    ],
    [
        ON,
        "loss_fn.truncated_importance_sampling_type=seq-mask-tis",
        "loss_fn.truncated_importance_sampling_ratio=1.002",
        "loss_fn.truncated_importance_sampling_ratio_min=0.999",
    ],
    ["loss_fn.use_cispo=true", "loss_fn.ratio_clip_c=null", "loss_fn.ratio_clip_max=4"],
    ["loss_fn.aggregation=seq_mean_token_sum_norm", "grpo.normalize_rewards=false"],
    ["loss_fn.aggregation=seq_mean_token_sum_norm", "loss_fn.loss_scale_factor=4096"],
    [GSPO, SEQ_MEAN],
    [GSPO, SEQ_MEAN, ON, "loss_fn.truncated_importance_sampling_ratio=2"],
]


@pytest.mark.parametrize(
    "overrides",
    ACCEPTED,
    ids=[
        "is",
        "tis",
        "icepop",
        "seq-mask-tis",
        "cispo",
        "dr-grpo",
        "dr-grpo-scale",
        "gspo",
        "gspo-tis",
    ],
)
def test_check_accepts_every_option_it_can_honour(overrides, capsys):
    assert run_check(capsys, *overrides) == (0, f"# {GPU_RECIPE}: valid")


# ---------------------------------------------------------------- the policy worker, TP=2 and DP=2


def _shift(rows: int, seq: int) -> torch.Tensor:
    """old - rollout: larger in later rows, so that at DP=2 the smallest weight is on rank 0 and
    the largest on rank 1 (each rank's own min and max differ from the step's)."""
    return torch.linspace(-0.9, 0.9, seq, dtype=F64) + 0.1 * torch.arange(rows, dtype=F64)[:, None]


def _corrected_step(rank, hf_dir, tp, options):
    cfg = recipe(hf_dir, tp, micro=2, kl=0.0)
    cfg.loss_fn = LossCfg(
        reference_policy_kl_penalty=0.0, use_importance_sampling_correction=True, **options
    )
    worker = new_worker(cfg, tp)
    batch = with_old_logprobs(worker, make_batch(7))
    # a rollout off by a fixed, position-dependent amount: some weights leave [0.5, 2]
    shift = _shift(batch.num_rows, batch.seq_len).float()
    batch.rollout_logp = torch.where(batch.loss_mask, batch.old_logp - shift, 0.0)
    result = worker.train_step(batch, worker.recipe_loss)
    return (
        result.metrics,
        batch.old_logp.numpy(),
        batch.loss_mask.numpy(),
        batch.records.is_soft.numpy(),
    )


@pytest.mark.multiproc
@pytest.mark.parametrize("gspo", [False, True], ids=["token", "gspo"])
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_corrected_step_on_two_ranks_matches_one_rank(tp, gspo, tmp_path):
    """icepop, per position (the fused pass) or under GSPO's per-response ratio (the autograd
    path), at TP=2 and DP=2 against one rank."""
    make_hf_model("qwen2", tmp_path)
    options = dict(
        truncated_importance_sampling_type="icepop",
        truncated_importance_sampling_ratio=2.0,
        truncated_importance_sampling_ratio_min=0.5,
    )
    if gspo:
        options |= dict(sequence_level_importance_ratios=True, aggregation="seq_mean_token_mean")
    expected, old, mask, soft = _corrected_step(0, str(tmp_path), 1, options)
    mask, soft = torch.from_numpy(mask), torch.from_numpy(soft)
    # the closed form of the metrics that do not depend on the model: w = exp(shift)
    shift = _shift(*mask.shape)
    for part, keep in (("", mask), ("/soft", mask & soft), ("/discrete", mask & ~soft)):
        w = shift[keep].exp()
        assert expected[f"is_weight{part}/min"] == pytest.approx(float(w.min()), rel=1e-5)
        assert expected[f"is_weight{part}/max"] == pytest.approx(float(w.max()), rel=1e-5)
        out = ((w < 0.5) | (w > 2.0)).double().mean()
        assert expected[f"is_weight{part}/truncated_fraction"] == pytest.approx(
            float(out), rel=1e-6
        )
        assert expected[f"is_weight{part}/mean"] == pytest.approx(float(w.mean()), rel=1e-5)
    assert 0 < expected["is_weight/truncated_fraction"] < 1
    for metrics, *_ in run_ranks(2, _corrected_step, str(tmp_path), tp, options):
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


class _Unfused(PolicyLoss):
    """The same loss declared as coupling positions: the worker takes the autograd path."""

    @property
    def per_position(self) -> bool:
        return False


@pytest.mark.parametrize("entropy", [0.0, 0.01], ids=["plain", "entropy"])
def test_the_autograd_path_updates_as_the_fused_pass(tmp_path, entropy):
    """The path a per-response (GSPO) or per-slot loss takes, every log-density of a micro-batch
    with its graph and then the loss, gives a per-position loss the update of the fused chunked
    pass (values and gradients equal up to float rounding)."""
    make_hf_model("qwen2", tmp_path)
    runs = []
    for loss_type in (PolicyLoss, _Unfused):
        cfg = recipe(str(tmp_path), micro=2, kl=0.0, entropy=entropy)
        worker = new_worker(cfg)
        batch = with_old_logprobs(worker, make_batch(7))
        before = [p.detach().clone() for p in worker.model.parameters()]
        result = worker.train_step(batch, loss_type(cfg.loss_fn))
        runs.append(([p.detach().clone() for p in worker.model.parameters()], result.metrics))
    (fused, expected), (unfused, metrics) = runs
    assert sum(not torch.equal(a, b) for a, b in zip(before, fused)) > len(before) // 2
    for a, b in zip(fused, unfused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for name in ("loss", "grad_norm", *(("entropy/mean",) if entropy else ())):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5), name


ICEPOP = [
    ON,
    "loss_fn.truncated_importance_sampling_type=icepop",
    "loss_fn.truncated_importance_sampling_ratio=5",
    "loss_fn.truncated_importance_sampling_ratio_min=0.5",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        [GSPO, SEQ_MEAN, ON, "loss_fn.truncated_importance_sampling_ratio=2"],
        ICEPOP,
        ["softgrpo.algorithm=multiplex", *ICEPOP],
    ],
    ids=["gspo+tis", "icepop", "multiplex+icepop"],
)
def test_the_embedded_model_trains_two_steps_with_gspo_and_icepop(
    tmp_path, tiny_model, smollm2_hf_dir, options
):
    """With `test_the_embedded_model_trains_two_steps_with_every_option`: every option trains, and
    Multiplex Thinking's per-slot correction too."""
    recipe_file = write_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2})
    assert main(["train", str(recipe_file), *options]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["optimizer_steps"] == 2 * row["step"]
        # the first update of a step starts at ratio 1; clipping binds whole responses
        assert 0.5 < row["ratio/mean"] < 2 and 0 <= row["clip_fraction"] <= 1
        # the rollout and the float32 trainer score every unit alike (per slot for multiplex)
        assert row["is_weight/min"] == pytest.approx(1.0, abs=1e-3)
        assert row["is_weight/max"] == pytest.approx(1.0, abs=1e-3)
        assert row["rollout_logp_mismatch"] < 1e-4


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama", path, vocab_size=49152)
    return path


@pytest.mark.slow
def test_the_embedded_model_trains_two_steps_with_every_option(
    tmp_path, tiny_model, smollm2_hf_dir
):
    recipe_file = write_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2})
    options = [
        ON,
        "loss_fn.truncated_importance_sampling_type=seq-mask-tis",
        "loss_fn.truncated_importance_sampling_ratio=1.5",
        "loss_fn.truncated_importance_sampling_ratio_min=0.5",
        "loss_fn.use_cispo=true",
        "loss_fn.ratio_clip_c=null",
        "loss_fn.aggregation=seq_mean_token_sum_norm",
        "grpo.normalize_rewards=false",
    ]
    assert main(["train", str(recipe_file), *options]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    documented = set(OPTIONAL_KEYS["loss_fn.use_importance_sampling_correction"])
    for row in rows:
        assert documented <= set(row) and not any(k.startswith("positions/") for k in row)
        assert row["optimizer_steps"] == 2 * row["step"]
        # the rollout and the float32 trainer score alike: every weight is 1 up to rounding
        for part in ("", "/soft", "/discrete"):
            assert row[f"is_weight{part}/min"] == pytest.approx(1.0, abs=1e-3)
            assert row[f"is_weight{part}/max"] == pytest.approx(1.0, abs=1e-3)
            assert row[f"is_weight{part}/truncated_fraction"] == 0.0
            assert 0 <= row[f"gen_kl{part}"] < 1e-6
