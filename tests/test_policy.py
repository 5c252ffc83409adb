"""PolicyWorker and training checkpoints on tiny models: log-probs against transformers (float64),
the first update, gradient accumulation, the non-finite-gradient skip, the entropy term (against
transformers), TP/PP/DP against one rank, exact resume in a fresh process, and resharding a
training checkpoint from TP=2 to TP=1."""

from __future__ import annotations

import gc
import math
import random
import weakref

import numpy as np
import pytest
import torch
from builders import (
    ANSWER_T,
    THINKING_T,
    assemble,
    make_batch,
    mixture_logits64,
    new_worker,
    recipe,
    sharded_pieces,
    with_old_logprobs,
)
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.batch import Batch


def reference_logprobs(hf_model, batch: Batch) -> torch.Tensor:
    """docs/algorithm.md section 2 in float64 with transformers: inputs sum_k w_k E[ids_k], logits j-1 score record j."""
    records = batch.records
    logits = mixture_logits64(hf_model, records)
    out = torch.zeros(batch.loss_mask.shape, dtype=torch.float64)
    for b, j in batch.loss_mask.nonzero().tolist():
        lj = logits[b, j - 1]
        if not records.is_soft[b, j]:
            out[b, j] = torch.log_softmax(lj / ANSWER_T, -1)[records.tokens[b, j]]
            continue
        support = records.support[b, j]
        pt = torch.softmax(
            (lj[records.mix_ids[b, j]] / THINKING_T).masked_fill(~support, -math.inf), -1
        )
        lam = torch.log(pt + 1e-6)
        z = (records.noise[b, j].double() - lam).clamp(-1.5, 3.0)
        m = (lam > -3).double()
        out[b, j] = (m * (-z - torch.exp(-z))).sum() / m.sum().clamp(min=1)
    return out


def reference_entropies(hf_model, batch: Batch) -> torch.Tensor:
    """Float64 entropy [B, S] (0 off loss_mask) of softmax(logits_{j-1} / T) over the real vocabulary, T the
    temperature record j was sampled at, differentiable in the weights; inputs detached as the trainer's are."""
    model = hf_model.double()
    records = batch.records
    inputs = (
        records.mix_weights.double().unsqueeze(-1)
        * model.get_input_embeddings().weight.detach()[records.mix_ids]
    ).sum(dim=2)
    logits = model(inputs_embeds=inputs).logits
    b, j = batch.loss_mask.nonzero(as_tuple=True)
    temperature = torch.tensor([ANSWER_T, THINKING_T], dtype=torch.float64)[
        records.is_soft[b, j].long()
    ].unsqueeze(-1)
    p = torch.softmax(logits[b, j - 1] / temperature, dim=-1)
    return torch.zeros(batch.loss_mask.shape, dtype=torch.float64).index_put(
        (b, j), torch.special.entr(p).sum(-1)
    )


def weights(worker) -> list[torch.Tensor]:
    return [p.detach().clone() for p in worker.model.parameters()]


def adam_state(worker) -> list[torch.Tensor]:
    """exp_avg, exp_avg_sq and step of every parameter shard, in the optimizer's order."""
    out = []
    for sub in worker.optimizer.chained_optimizers:
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                s = inner.state[p]
                out += [s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone().reshape(1)]
    return out


def portable(tensors) -> list[np.ndarray]:
    """Results of spawned ranks travel as numpy arrays: torch shares tensor storage with the
    parent through a file descriptor that vanishes when the child exits first."""
    return [torch.as_tensor(t).numpy() for t in tensors]


def train(worker, batch):
    """One optimizer step with the recipe's loss, as the trainer hands it over."""
    return worker.train_step(batch, worker.recipe_loss)


# ------------------------------------------------------------------ single process


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_logprobs_match_transformers_in_float64(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path)
    batch = make_batch(seed=1)
    assert batch.records.is_soft.any() and (batch.loss_mask & ~batch.records.is_soft).any()
    worker = new_worker(recipe(tmp_path, micro=2))
    expected = reference_logprobs(hf, batch)
    for logp in (worker.compute_logprobs(batch), worker.compute_logprobs(batch, reference=True)):
        assert logp.dtype == torch.float32 and logp.shape == batch.loss_mask.shape
        assert (logp.double() - expected).abs().max() <= 1e-4
        assert (logp[~batch.loss_mask] == 0).all()
    # an odd number of rows is padded internally and trimmed again; the padding row shares a GEMM
    # with row 2, which BLAS does not promise leaves row 2's bits alone (they differ on AMD EPYC)
    odd, whole = worker.compute_logprobs(batch.row_slice(0, 3)), worker.compute_logprobs(batch)[:3]
    assert odd.shape == whole.shape and (odd - whole).abs().max() <= 1e-5


def test_first_update_ratio_is_exactly_one_and_kl_zero(tmp_path):
    make_hf_model("qwen2", tmp_path)
    worker = new_worker(recipe(tmp_path, micro=2, kl=0.5))
    batch = with_old_logprobs(worker, make_batch(seed=2))
    assert torch.equal(batch.old_logp, batch.ref_logp)
    result = train(worker, batch)
    assert (
        result.updated and result.metrics["ratio/mean"] == 1.0 and result.metrics["kl/mean"] == 0.0
    )
    assert (
        result.metrics["clip_fraction/low"]
        == result.metrics["clip_fraction/high"]
        == result.metrics["dual_clip_fraction"]
        == 0.0
    )
    # at ratio 1 every surrogate is -A: token mean per micro-batch (2 rows), averaged over micro-batches
    mask, adv = batch.loss_mask, batch.advantages.double()
    per_micro = [-(adv[i : i + 2][mask[i : i + 2]]).mean() for i in (0, 2)]
    assert result.metrics["loss"] == pytest.approx(float(sum(per_micro) / 2), abs=1e-6)
    # the update moved the policy away from the reference
    assert not torch.equal(worker.compute_logprobs(batch), batch.ref_logp)


@pytest.mark.parametrize("kind,taken", [("qwen2", True), ("llama", False)])
def test_the_output_weight_gradient_goes_to_ddp_main_grad_unless_tied(
    kind, taken, tmp_path, monkeypatch
):
    """The worker hands the fused objective Megatron DDP's sink: the untied output weight (the
    tiny Qwen2) takes its gradient in main_grad in one pass; the tied one (the tiny Llama) in
    `.grad`, which its input-embedding use also feeds."""
    from megatron_softgrpo.train import policy

    sink, calls = policy.add_to_main_grad, []

    def spy(weight, total, scale):
        calls.append(sink(weight, total, scale))
        return calls[-1]

    monkeypatch.setattr(policy, "add_to_main_grad", spy)
    make_hf_model(kind, tmp_path)
    worker = new_worker(recipe(tmp_path, micro=2))
    assert train(worker, with_old_logprobs(worker, make_batch(seed=2))).updated
    assert calls and set(calls) == {taken}


def test_fp8_token_alignment_pads_positions_without_changing_logprobs_or_the_update(tmp_path):
    """FP8 GEMMs need tokens in multiples of 16 (32 for MXFP8): the worker appends unscored
    zero positions after every record, which causal attention never lets the real ones see."""
    from types import SimpleNamespace

    from megatron.core.enums import Fp8Recipe

    from megatron_softgrpo.models.build import token_alignment

    assert token_alignment(SimpleNamespace(fp8=None)) == 1
    assert token_alignment(SimpleNamespace(fp8="e4m3", fp8_recipe=Fp8Recipe.blockwise)) == 16
    assert token_alignment(SimpleNamespace(fp8="e4m3", fp8_recipe=Fp8Recipe.mxfp8)) == 32
    make_hf_model("qwen2", tmp_path)
    results = {}
    for alignment in (1, 16):
        worker = new_worker(recipe(tmp_path, micro=2))
        worker.seq_alignment = alignment
        run, lengths = worker._run, set()
        worker._run = lambda model, micro_batches, *a, **k: (
            lengths.add(micro_batches[0].seq_len),
            run(model, micro_batches, *a, **k),
        )[1]
        batch = with_old_logprobs(worker, make_batch(seed=4))  # 12 positions, run as 16
        result = train(worker, batch)
        assert lengths == {max(12, alignment)}  # log-probs and the update both ran aligned
        results[alignment] = (batch.old_logp, result, weights(worker))
    (logp1, m1, w1), (logp16, m16, w16) = results[1], results[16]
    assert logp16.shape == logp1.shape == (4, 12)
    # equal up to fp32 rounding: longer rows change the GEMMs' summation order
    assert (logp16 - logp1).abs().max() <= 1e-5
    assert m16.metrics["loss"] == pytest.approx(m1.metrics["loss"], abs=1e-5)
    assert max((a - b).abs().max() for a, b in zip(w1, w16)) <= 1e-5


def test_kl_coefficient_zero_builds_no_reference_model(tmp_path):
    make_hf_model("qwen2", tmp_path)
    worker = new_worker(recipe(tmp_path, micro=2, kl=0.0))
    assert worker.reference is None
    batch = make_batch(seed=2)
    with pytest.raises(ValueError, match="no reference model"):
        worker.compute_logprobs(batch, reference=True)
    batch.old_logp = worker.compute_logprobs(batch)  # no ref_logp needed without a reference model
    result = train(worker, batch)
    assert result.updated and "kl/mean" not in result.metrics


def test_a_dropped_worker_is_freed_with_its_process_groups(tmp_path):
    """Megatron's DDP gradient hooks (a cycle through C++ the collector cannot see) and RoPE's
    cache kept every dropped model alive, and its process groups with it: by the end of the
    suite a thousand gloo groups whose threads took half the CPU. After an update and the
    teardown, the worker's models and their groups are gone."""
    from megatron_softgrpo.distributed import destroy_distributed

    make_hf_model("qwen2", tmp_path)
    worker = new_worker(recipe(tmp_path, micro=2))
    result = train(worker, with_old_logprobs(worker, make_batch(seed=2)))
    assert result.updated  # the hooks ran: the gradient reached DDP's buffer
    gone = [weakref.ref(x) for x in (worker.ddp, worker.model, worker.reference, worker.vocab)]
    groups = weakref.WeakSet(g for g in vars(worker.parallel.groups).values() if g is not None)
    del worker, result
    destroy_distributed()
    gc.collect()
    assert [r() is None for r in gone] == [True] * 4
    assert len(groups) == 0


@pytest.mark.parametrize("aggregation", ["token_mean_global", "seq_mean_token_mean"])
def test_two_micro_batches_of_one_equal_one_micro_batch_of_two(aggregation, tmp_path):
    make_hf_model("qwen2", tmp_path)
    batch = make_batch(seed=3).row_slice(0, 2)
    assert batch.loss_mask[0].sum() != batch.loss_mask[1].sum()  # unequal lengths: the modes differ
    results = {}
    for micro in (1, 2):
        worker = new_worker(recipe(tmp_path, micro=micro, aggregation=aggregation))
        result = train(worker, with_old_logprobs(worker, make_batch(seed=3).row_slice(0, 2)))
        results[micro] = (result.metrics["loss"], weights(worker))
    assert results[1][0] == pytest.approx(results[2][0], abs=1e-6)
    assert max((a - b).abs().max() for a, b in zip(results[1][1], results[2][1])) <= 1e-6


def test_token_mean_microbatch_weighs_micro_batches_equally(tmp_path):
    """The reference aggregation: with unequal lengths, 2 x 1 row differs from 1 x 2 rows."""
    make_hf_model("qwen2", tmp_path)
    losses = {}
    for micro in (1, 2):
        worker = new_worker(recipe(tmp_path, micro=micro))
        losses[micro] = train(
            worker, with_old_logprobs(worker, make_batch(seed=3).row_slice(0, 2))
        ).metrics["loss"]
    batch = make_batch(seed=3).row_slice(0, 2)
    adv, mask = batch.advantages.double(), batch.loss_mask
    assert losses[1] == pytest.approx(
        float((-adv[0][mask[0]].mean() - adv[1][mask[1]].mean()) / 2), abs=1e-6
    )
    assert losses[2] == pytest.approx(float(-adv[mask].mean()), abs=1e-6)
    assert abs(losses[1] - losses[2]) > 1e-3


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_entropy_term_alone_follows_the_entropy_gradient(kind, tmp_path):
    """Zero advantages and no KL: the only gradient is that of -coef x entropy. Its value, mean and
    gradient norm match transformers in float64, the step raises the entropy, and coef 0 gives no gradient."""
    hf = make_hf_model(kind, tmp_path)
    coef = 0.1
    batch = make_batch(seed=9)
    batch.advantages = torch.zeros_like(batch.advantages)
    worker = new_worker(recipe(tmp_path, micro=2, kl=0.0, entropy=coef))
    before = weights(worker)
    result = train(worker, with_old_logprobs(worker, batch))

    entropy, mask = reference_entropies(hf, batch), batch.loss_mask
    objective = (
        -coef * sum(entropy[i : i + 2][mask[i : i + 2]].mean() for i in (0, 2)) / 2
    )  # token mean per micro-batch
    objective.backward()
    grad_norm = math.sqrt(
        sum(float((p.grad**2).sum()) for p in hf.parameters() if p.grad is not None)
    )
    assert (
        result.updated and result.metrics["policy_loss"] == 0.0 and "kl/mean" not in result.metrics
    )
    assert (
        result.metrics["ratio/mean"] == 1.0
    )  # the log-densities computed alongside the entropy are the old ones, bitwise
    assert result.metrics["loss"] == pytest.approx(float(objective.detach()), abs=1e-6)
    assert result.metrics["entropy/mean"] == pytest.approx(float(entropy[mask].mean()), abs=1e-5)
    assert result.metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert max((a - b).abs().max() for a, b in zip(before, weights(worker))) > 1e-4
    # the step ascended the entropy: the same batch now has a larger one
    assert train(worker, batch).metrics["entropy/mean"] > result.metrics["entropy/mean"] + 1e-3
    plain = new_worker(recipe(tmp_path, micro=2, kl=0.0))
    without = train(plain, with_old_logprobs(plain, batch))
    assert (
        "entropy/mean" not in without.metrics
        and without.metrics["loss"] == 0.0
        and without.metrics["grad_norm"] == 0.0
    )


@pytest.mark.parametrize(
    "distributed", [True, False], ids=["distributed-optimizer", "fp32-optimizer"]
)
def test_non_finite_gradient_skips_the_step(distributed, tmp_path):
    make_hf_model("qwen2", tmp_path)
    worker = new_worker(recipe(tmp_path, micro=2, warmup=4, distributed=distributed))
    good = with_old_logprobs(worker, make_batch(seed=4))
    assert train(worker, good).updated  # AdamW state exists from here on
    before, state_before = weights(worker), adam_state(worker)
    bad = with_old_logprobs(worker, make_batch(seed=5))
    # on a discrete row (a soft row's density can be locally flat: clamped noise, no gradient at all)
    b, j = (bad.loss_mask & ~bad.records.is_soft).nonzero()[0].tolist()
    bad.advantages[b, j] = math.nan
    result = train(worker, bad)
    assert not result.updated and not math.isfinite(result.metrics["grad_norm"])
    assert worker.skipped_steps == 1 and worker.optimizer_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, weights(worker)))
    assert all(torch.equal(a, b) for a, b in zip(state_before, adam_state(worker)))
    # the schedule did not advance, and the next finite step trains normally
    after = train(worker, with_old_logprobs(worker, make_batch(seed=6)))
    assert (
        after.updated
        and math.isfinite(after.metrics["grad_norm"])
        and after.metrics["lr"] == result.metrics["lr"] == pytest.approx(1e-3 / 4)
    )
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(worker)))


def _draws():
    """One value from each RNG a checkpoint restores (Python, numpy, torch, Megatron's tracker)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(2)
    return [random.random(), float(np.random.rand()), torch.rand(2), tracker]


def _train(rank, hf_dir, ckpt_dir, seeds, save):
    """Resume from ckpt_dir if it has a checkpoint, train on `seeds` (saving after each step if `save`).
    RNG draws are taken right after the resume, or right after the last save."""
    from megatron_softgrpo.train import checkpointing

    cfg = recipe(hf_dir, micro=2, warmup=3, ckpt=ckpt_dir, keep=1)
    worker = new_worker(cfg)
    restored = checkpointing.resume(cfg.checkpointing, worker)
    draws = _draws() if restored else None
    for step, seed in enumerate(seeds, start=restored.step + 1 if restored else 1):
        train(worker, with_old_logprobs(worker, make_batch(seed)))
        if save:
            checkpointing.save_training_checkpoint(
                cfg.checkpointing, worker, step, {"data_position": step}
            )
    if save:
        draws = _draws()
    return (
        restored,
        draws and portable(draws),
        portable(weights(worker)),
        portable(adam_state(worker)),
        worker.scheduler.num_steps,
    )


@pytest.fixture
def one_thread():
    """Bitwise comparisons with spawned ranks (which run one thread) need the same thread count here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.multiproc
def test_exact_resume_in_a_fresh_process(tmp_path, one_thread):
    """4 steps straight vs 2 steps + save, then in a fresh process: load + 2 steps."""
    make_hf_model("qwen2", tmp_path / "hf")
    hf, ckpt, seeds = str(tmp_path / "hf"), tmp_path / "ckpt", [10, 11, 12, 13]
    _, _, straight_weights, straight_state, straight_steps = _train(
        0, hf, str(tmp_path / "none"), seeds, False
    )
    _, saved_draws, _, _, _ = _train(0, hf, str(ckpt), seeds[:2], True)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000002"]  # keep_top_k=1
    [(restored, draws, final, state, steps)] = run_ranks(1, _train, hf, str(ckpt), seeds[2:], False)
    assert restored.step == 2 and restored.extra == {"data_position": 2}
    assert all(np.array_equal(a, b) for a, b in zip(draws, saved_draws))
    assert all(np.array_equal(a, b) for a, b in zip(final, straight_weights))
    assert all(np.array_equal(a, b) for a, b in zip(state, straight_state))
    assert steps == straight_steps == 4


@pytest.mark.parametrize(
    "distributed", [True, False], ids=["distributed-optimizer", "fp32-optimizer"]
)
def test_crash_during_save_leaves_the_previous_checkpoint(distributed, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from megatron_softgrpo.train import checkpointing

    make_hf_model("qwen2", tmp_path / "hf")
    cfg = recipe(tmp_path / "hf", micro=2, ckpt=tmp_path / "ckpt", distributed=distributed)
    worker = new_worker(cfg)
    train(worker, with_old_logprobs(worker, make_batch(20)))
    checkpointing.save_training_checkpoint(cfg.checkpointing, worker, 1, {})
    saved, saved_state = weights(worker), adam_state(worker)
    train(worker, with_old_logprobs(worker, make_batch(21)))

    real_save = dist_checkpointing.save

    def crash_on_optimizer(sharded, directory, *args, **kwargs):
        if directory.endswith("optimizer"):
            raise RuntimeError("simulated crash mid-save")
        return real_save(sharded, directory, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", crash_on_optimizer)
    with pytest.raises(RuntimeError, match="simulated"):
        checkpointing.save_training_checkpoint(cfg.checkpointing, worker, 2, {})
    monkeypatch.undo()

    assert checkpointing.latest_checkpoint(cfg.checkpointing.checkpoint_dir).name == "step_0000001"
    fresh = new_worker(cfg)
    assert checkpointing.resume(cfg.checkpointing, fresh).step == 1
    assert all(torch.equal(a, b) for a, b in zip(saved, weights(fresh)))
    assert all(torch.equal(a, b) for a, b in zip(saved_state, adam_state(fresh)))


# ------------------------------------------------------------------ several ranks


def _first_step(rank, hf_dir, tp, pp, seed, entropy=0.0):
    worker = new_worker(recipe(hf_dir, tp, pp, entropy=entropy), tp, pp)
    batch = with_old_logprobs(worker, make_batch(seed))
    result = train(worker, batch)
    pieces = [
        (key, shape, offset, prepend, data.numpy())
        for key, shape, offset, prepend, data in sharded_pieces(worker.model)
    ]
    return result, batch.old_logp.numpy(), pieces


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "kind,tp,pp", [("qwen2", 2, 1), ("llama", 1, 2), ("qwen2", 1, 1)], ids=["tp2", "pp2", "dp2"]
)
def test_one_step_on_two_ranks_matches_one_rank(kind, tp, pp, tmp_path):
    make_hf_model(kind, tmp_path)
    expected_result, expected_logp, expected_pieces = _first_step(0, str(tmp_path), 1, 1, seed=7)
    expected = assemble([expected_pieces])
    results = run_ranks(2, _first_step, str(tmp_path), tp, pp, 7)
    got = assemble(pieces for _, _, pieces in results)
    expected_logp = torch.from_numpy(expected_logp)
    assert got.keys() == expected.keys()
    for key in expected:
        assert (got[key] - expected[key]).abs().max() <= 1e-5, key
    for result, logp, _ in results:  # every rank reports the same
        assert result.updated
        assert result.metrics["loss"] == pytest.approx(expected_result.metrics["loss"], abs=1e-5)
        assert result.metrics["grad_norm"] == pytest.approx(
            expected_result.metrics["grad_norm"], rel=1e-5
        )
        assert (torch.from_numpy(logp) - expected_logp).abs().max() <= 1e-5
    # the step changed the weights by far more than the tolerance
    initial = assemble([sharded_pieces(new_worker(recipe(tmp_path)).model)])
    assert max((expected[k] - initial[k]).abs().max() for k in expected) > 1e-4


@pytest.mark.multiproc
def test_entropy_step_at_tp2_matches_one_rank(tmp_path):
    """(Sequence parallelism needs Transformer Engine's norms: the entropy under it is checked in
    test_soft_tensor_parallel.)"""
    make_hf_model("qwen2", tmp_path)
    coef = 1.0  # the entropy's gradient comparable to the policy term's
    expected_result, _, expected_pieces = _first_step(0, str(tmp_path), 1, 1, 7, coef)
    expected = assemble([expected_pieces])
    results = run_ranks(2, _first_step, str(tmp_path), 2, 1, 7, coef)
    got = assemble(pieces for _, _, pieces in results)
    for key in expected:
        assert (got[key] - expected[key]).abs().max() <= 1e-5, key
    for result, _, _ in results:
        assert result.metrics["loss"] == pytest.approx(expected_result.metrics["loss"], abs=1e-5)
        assert result.metrics["entropy/mean"] == pytest.approx(
            expected_result.metrics["entropy/mean"], abs=1e-5
        )
        assert result.metrics["grad_norm"] == pytest.approx(
            expected_result.metrics["grad_norm"], rel=1e-5
        )
    # the entropy term is a large part of the objective (KL is 0 on a first step)
    assert (
        expected_result.metrics["policy_loss"] - expected_result.metrics["loss"]
        > 0.5 * coef * expected_result.metrics["entropy/mean"]
    )


def _step_with_nan_on_rank_1(rank, hf_dir):
    worker = new_worker(recipe(hf_dir))
    batch = with_old_logprobs(worker, make_batch(8))
    b, j = (
        (batch.loss_mask & ~batch.records.is_soft)[2:].nonzero()[0].tolist()
    )  # rows 2-3 are data-parallel rank 1's
    batch.advantages[2 + b, j] = math.inf
    before = weights(worker)
    result = train(worker, batch)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, weights(worker)))
    return result, worker.skipped_steps, unchanged


@pytest.mark.multiproc
def test_non_finite_gradient_on_one_data_parallel_rank_skips_on_all(tmp_path):
    make_hf_model("qwen2", tmp_path)
    for result, skipped, unchanged in run_ranks(2, _step_with_nan_on_rank_1, str(tmp_path)):
        assert (
            not result.updated and not math.isfinite(result.metrics["grad_norm"]) and skipped == 1
        )
        assert unchanged


def _train_and_save_at_tp2(rank, hf_dir, ckpt_dir):
    from megatron_softgrpo.train import checkpointing

    cfg = recipe(hf_dir, 2, 1, ckpt=ckpt_dir)
    worker = new_worker(cfg, 2, 1)
    train(worker, with_old_logprobs(worker, make_batch(30)))
    checkpointing.save_training_checkpoint(cfg.checkpointing, worker, 1, {"saved_at": "tp2"})


@pytest.mark.multiproc
def test_checkpoint_saved_at_tp2_restores_at_tp1(tmp_path, capsys):
    from megatron_softgrpo.train import checkpointing

    make_hf_model("qwen2", tmp_path / "hf")
    run_ranks(2, _train_and_save_at_tp2, str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    cfg = recipe(tmp_path / "hf", ckpt=tmp_path / "ckpt")

    baseline = new_worker(cfg)  # the same step at TP=1
    train(baseline, with_old_logprobs(baseline, make_batch(30)))
    restored = new_worker(cfg)
    assert checkpointing.resume(cfg.checkpointing, restored).extra == {"saved_at": "tp2"}
    assert "RNG states left as seeded" in capsys.readouterr().out
    assert restored.optimizer_steps == 1 and restored.scheduler.num_steps == 1
    for a, b in zip(weights(restored), weights(baseline)):
        assert (a - b).abs().max() <= 1e-5
    for a, b in zip(
        adam_state(restored), adam_state(baseline)
    ):  # moments: rounding-level differences only
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-12
    # the restored moments drive the next update as the baseline's do
    for worker in (restored, baseline):
        train(worker, with_old_logprobs(worker, make_batch(31)))
    for a, b in zip(weights(restored), weights(baseline)):
        assert (a - b).abs().max() <= 1e-5
