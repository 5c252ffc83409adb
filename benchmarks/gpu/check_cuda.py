"""Correctness on CUDA: the soft-token core and the model path give the CPU's results.

Each check computes the same thing on the CPU (fp32, the tested reference) and on the GPU
(fp32 and bf16) from identical inputs, and compares within a stated tolerance:

- samplers: greedy discrete, and Gumbel with noise scale 0 (deterministic): same ids/tokens,
  weights within tolerance; a seeded noisy Gumbel step is reproducible on the GPU;
- log-densities from logits and the chunked log-density from hidden states (values and
  gradients), soft and discrete rows;
- the policy loss (every term, dual clip, KL, entropy) and its gradient, and the training
  path's fused objective (`objective_from_hidden` with the policy loss's per-position terms):
  value and gradients on the GPU (fp32, and bf16 weights) vs scores-then-autograd on the CPU;
- the mixture embedding on a Megatron model: one-hot equals the model's own embedding and a
  soft mixture equals sum_k w_k E[ids_k] computed on the CPU;
- KV-cached greedy decoding equals full recomputation on the GPU;
- the refit bridge's NCCL backend builds and broadcasts a device tensor (one member: the
  device has one GPU, and NCCL refuses two ranks on one; two GPUs are untested).

Noise is drawn from the device's generator, so noisy samples are compared for
reproducibility on the GPU, not against the CPU's stream.

    python3 benchmarks/gpu/check_cuda.py --tokenizer DIR [--json FILE]     (needs a GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

V, PADDED, N, K = 151_936, 152_064, 64, 5  # Qwen2's vocabulary: bf16 rounding at its real width
DEV = "cuda"  # --smoke-cpu runs every check CPU-vs-CPU, to test this script without a GPU
results: dict[str, dict] = {}
JSON_PATH: str | None = None  # rewritten after each check: a run cut short keeps what it checked


def record(name: str, diff: float, tol: float, extra: str = "") -> None:
    ok = bool(diff <= tol)
    results[name] = {"max_abs_diff": diff, "tolerance": tol, "ok": ok}
    print(
        f"{'PASS' if ok else 'FAIL'} {name}: max|diff| {diff:.3g} (tol {tol:g}) {extra}", flush=True
    )
    if JSON_PATH:
        device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
        Path(JSON_PATH).write_text(json.dumps({"device": device, "checks": results}, indent=2))


def check_samplers():
    from megatron_softgrpo.soft import (
        DiscreteSampler,
        GumbelNoise,
        MultiplexSampler,
        SoftSampler,
        Truncation,
        VocabShard,
        seed_noise_rng,
    )

    shard = VocabShard.whole(PADDED, V)
    logits = torch.randn(N, PADDED, generator=torch.Generator().manual_seed(0)) * 4
    greedy = DiscreteSampler(Truncation.greedy(), K)
    deterministic = SoftSampler(Truncation(1.0, K, 0.95), K, GumbelNoise(tau=0.1, scale=0.0))
    noisy = SoftSampler(Truncation(1.0, K, 0.95), K, GumbelNoise(tau=0.1, scale=1.0))
    seed_noise_rng(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        x = logits.to(dtype)
        cpu_g, gpu_g = greedy.sample(x, shard), greedy.sample(x.to(DEV), shard)
        record(
            f"sampler/greedy_tokens/{dtype}", float((cpu_g.tokens != gpu_g.tokens.cpu()).sum()), 0
        )
        record(
            f"sampler/greedy_log_density/{dtype}",
            float((cpu_g.log_density - gpu_g.log_density.cpu()).abs().max()),
            1e-4,
        )
        cpu_s, gpu_s = deterministic.sample(x, shard), deterministic.sample(x.to(DEV), shard)
        record(
            f"sampler/gumbel_c0_ids/{dtype}", float((cpu_s.mix_ids != gpu_s.mix_ids.cpu()).sum()), 0
        )
        record(
            f"sampler/gumbel_c0_weights/{dtype}",
            float((cpu_s.mix_weights - gpu_s.mix_weights.cpu()).abs().max()),
            tol,
        )
    # Multiplex Thinking: the same uniforms on both devices give the same K draws, by candidates
    # (top-k) and by the sharded inverse CDF (no truncation); a draw whose uniform falls within
    # rounding of a CDF step may flip, so a few in N x K are tolerated
    u = torch.rand(N, K, generator=torch.Generator().manual_seed(2))
    for name, trunc in (("top_k", Truncation(1.0, 20)), ("whole", Truncation(0.8))):
        multiplex = MultiplexSampler(trunc, K)
        cpu_m, gpu_m = (
            multiplex.sample(logits, shard, u),
            multiplex.sample(logits.to(DEV), shard, u.to(DEV)),
        )
        same = cpu_m.mix_ids == gpu_m.mix_ids.cpu()
        record(f"sampler/multiplex_{name}_ids", float((~same).sum()), 0.005 * N * K)
        record(
            f"sampler/multiplex_{name}_slot_logp",
            float((cpu_m.noise - gpu_m.noise.cpu())[same].abs().max()),
            1e-4,
        )
    seed_noise_rng(7)
    a = noisy.sample(logits.to(DEV), shard)
    seed_noise_rng(7)
    b = noisy.sample(logits.to(DEV), shard)
    record(
        "sampler/gumbel_seeded_reproducible_on_gpu",
        float((a.mix_weights - b.mix_weights).abs().max()),
        0,
    )
    return noisy, shard, logits


def check_log_densities(noisy, shard, logits):
    from megatron_softgrpo.soft import (
        GumbelNoise,
        Scorer,
        log_density_from_hidden,
        log_density_from_logits,
        seed_noise_rng,
    )

    scorer = Scorer(GumbelNoise(tau=0.1, scale=1.0), 1.0, 1.0)
    seed_noise_rng(3)
    records = noisy.sample(logits, shard)  # soft rows; make every other row discrete
    discrete = torch.arange(N) % 2 == 0
    records.is_soft = ~discrete
    cpu = log_density_from_logits(logits, records, scorer, shard)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        gpu = log_density_from_logits(
            logits.to(dtype).to(DEV), records.map(lambda t: t.to(DEV)), scorer, shard
        ).cpu()
        ref = (
            cpu
            if dtype == torch.float32
            else log_density_from_logits(logits.to(dtype), records, scorer, shard)
        )
        record(
            f"log_density_from_logits/{dtype}",
            float((gpu - ref).abs().max()),
            tol if dtype == torch.float32 else 1e-3,
        )

    # chunked from hidden states: values and gradients, [s, b] rows
    s, b, h = 256, 2, 128
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(s, b, h, generator=g)
    weight = torch.randn(PADDED, h, generator=g) * 0.1
    tokens = torch.randint(0, V, (b, s), generator=g)
    flat_logits = torch.einsum("sbh,vh->bsv", hidden, weight)
    seed_noise_rng(4)
    # sample from a slightly different policy: at old == new, recovered noise sits exactly on the
    # clamp bounds for some slots and whether they get gradient depends on rounding (as in the reference)
    behaviour = flat_logits + 0.3 * torch.randn(flat_logits.shape, generator=g)
    step = noisy.sample(behaviour.reshape(-1, PADDED), shard)
    seq_records = step.map(lambda t: t.reshape(b, s, *t.shape[1:]))
    seq_records.tokens = torch.where(
        seq_records.is_soft & (torch.arange(s) % 3 == 0), tokens, seq_records.tokens
    )
    seq_records.is_soft = seq_records.is_soft & (torch.arange(s) % 3 != 0)

    def run(device):
        hd = hidden.detach().to(device).clone().requires_grad_()
        wt = weight.detach().to(device).clone().requires_grad_()
        logp = log_density_from_hidden(
            hd, wt, seq_records.map(lambda t: t.to(device)), scorer, shard
        )
        logp.sum().backward()
        return logp.detach().cpu(), hd.grad.cpu(), wt.grad.cpu()

    (e_c, gh_c, gw_c), (e_g, gh_g, gw_g) = run("cpu"), run(DEV)
    record("log_density_from_hidden/value/fp32", float((e_c - e_g).abs().max()), 1e-4)
    record(
        "log_density_from_hidden/grad_hidden/fp32",
        float((gh_c - gh_g).abs().max() / gh_c.abs().max()),
        1e-4,
        "(relative)",
    )
    record(
        "log_density_from_hidden/grad_weight/fp32",
        float((gw_c - gw_g).abs().max() / gw_c.abs().max()),
        1e-4,
        "(relative)",
    )
    check_policy_objective(scorer, shard, hidden, weight, seq_records)


def check_policy_objective(scorer, shard, hidden, weight, records):
    """The policy loss, and the fused training objective built from its per-position terms."""
    from megatron_softgrpo.algorithms.loss import (
        LossScale,
        aggregation_weights,
        policy_loss,
        token_terms,
    )
    from megatron_softgrpo.config.schema import LossCfg
    from megatron_softgrpo.soft import log_density_and_entropy_from_hidden, objective_from_hidden
    from model_patches.wgrad_accumulation import add_to_main_grad

    cfg = LossCfg(
        ratio_clip_c=3.0,
        reference_policy_kl_penalty=0.05,
        entropy_coef=0.01,
        aggregation="seq_mean_token_mean",
    )
    scale = LossScale(num_micro_batches=2)
    b, s = records.tokens.shape
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(b, s, generator=g) > 0.2
    with torch.no_grad():
        ell0, _ = log_density_and_entropy_from_hidden(hidden, weight, records, scorer, shard)
    old = ell0 + 0.3 * torch.randn(b, s, generator=g)
    ref = ell0 + 0.3 * torch.randn(b, s, generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, s).contiguous()

    def loss_on(device, logp, entropy):
        d = lambda t: t.to(device)  # noqa: E731
        return policy_loss(
            logp, d(old), d(adv), d(mask), cfg, ref_logp=d(ref), entropy=entropy, scale=scale
        ).loss

    def scores_then_autograd(
        device, dtype
    ):  # the reference: log-densities, then the loss by autograd
        hd = hidden.to(device, dtype, copy=True).requires_grad_()
        wt = weight.to(device, dtype, copy=True).requires_grad_()
        logp, entropy = log_density_and_entropy_from_hidden(
            hd, wt, records.map(lambda t: t.to(device)), scorer, shard
        )
        loss = loss_on(device, logp, entropy)
        loss.backward()
        return (
            loss.detach().cpu(),
            hd.grad.float().cpu(),
            wt.grad.float().cpu(),
            logp.detach().cpu(),
            entropy.detach().cpu(),
        )

    references = {torch.float32: scores_then_autograd("cpu", torch.float32)}
    want, _, _, logp, entropy = references[torch.float32]
    references[torch.bfloat16] = scores_then_autograd(
        DEV, torch.bfloat16
    )  # bf16 rounding moves Gumbel gradients
    lp, en = (t.to(DEV, copy=True).requires_grad_() for t in (logp, entropy))
    got = loss_on(DEV, lp, en)
    got.backward()
    lp_c, en_c = (t.clone().requires_grad_() for t in (logp, entropy))
    loss_on("cpu", lp_c, en_c).backward()
    record("policy_loss/value", abs(float(got.cpu() - want)), 1e-6)
    record("policy_loss/grad_logp", float((lp.grad.cpu() - lp_c.grad).abs().max()), 1e-7)

    # fp32 on the GPU vs the CPU's fp32 reference; bf16 vs the same computation unfused on the GPU
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-3)):
        want, want_gh, want_gw, _, _ = references[dtype]
        at = mask.nonzero(as_tuple=True)
        d = lambda t: t.to(DEV)  # noqa: E731
        weights = d(aggregation_weights(mask, cfg.aggregation, scale)[at].float())
        o, a, r = d(old[at]), d(adv[at]), d(ref[at])

        def objective(e, h, pos):
            terms = token_terms(
                e,
                o[pos],
                a[pos],
                torch.ones_like(e, dtype=torch.bool),
                cfg,
                ref_logp=r[pos],
                entropy=h,
            )
            return weights[pos] * terms.objective(cfg)

        hd = (
            hidden.to(DEV).transpose(0, 1)[at].unsqueeze(1).to(dtype).requires_grad_()
        )  # [n, 1, h] as the trainer passes
        wt = weight.to(DEV, dtype, copy=True).requires_grad_()
        picked = records.map(lambda t: t[at].unsqueeze(0).to(DEV))
        fused = objective_from_hidden(hd, wt, picked, scorer, shard, objective, True)
        fused.value.backward()
        gh = (
            torch.zeros_like(hidden.transpose(0, 1))
            .index_put(at, hd.grad.squeeze(1).float().cpu())
            .transpose(0, 1)
        )
        tag = f"fused_objective/{dtype}"
        # an untied weight under Megatron's DDP: the same gradient lands in its fp32 main_grad
        wm = weight.to(DEV, dtype, copy=True).requires_grad_()
        wm.main_grad, wm.grad_added_to_main_grad = torch.zeros_like(wm, dtype=torch.float32), False
        hm = hd.detach().requires_grad_()
        fused_m = objective_from_hidden(
            hm, wm, picked, scorer, shard, objective, True, weight_gradient=add_to_main_grad
        )
        fused_m.value.backward()
        record(
            f"{tag}/main_grad_vs_grad",
            float((wm.main_grad - wt.grad.float()).abs().max() / wt.grad.float().abs().max()),
            tol,
            "(relative)",
        )
        record(
            f"{tag}/value",
            abs(float(fused.value.detach().cpu() - want)) / max(1.0, abs(float(want))),
            tol,
            "(relative)",
        )
        record(
            f"{tag}/grad_hidden",
            float((gh - want_gh).abs().max() / want_gh.abs().max()),
            tol,
            "(relative)",
        )
        record(
            f"{tag}/grad_weight",
            float((wt.grad.float().cpu() - want_gw).abs().max() / want_gw.abs().max()),
            tol,
            "(relative)",
        )


def check_model_path(tokenizer_dir: str):
    from tiny_models import make_hf_model
    from transformers import AutoTokenizer

    from megatron_softgrpo.config.schema import MegatronCfg
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import resolve_model_source
    from megatron_softgrpo.rollout.engine import RolloutEngine
    from megatron_softgrpo.rollout.megatron_backend import MegatronBackend
    from megatron_softgrpo.rollout.settings import RolloutSettings
    from megatron_softgrpo.soft import DiscreteSampler, MixtureRecord, Truncation, VocabShard
    from model_patches.mixture_embedding import mixture_embedding

    with tempfile.TemporaryDirectory() as tmp:
        make_hf_model("qwen2", Path(tmp), vocab_size=1000)
        parallel = init_distributed(ParallelLayout(1, 1))
        model, padded = load_model(resolve_model_source(tmp), MegatronCfg(), parallel)
    model.eval()
    emb = model.embedding.word_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 7, K), generator=g)
    weights = torch.softmax(torch.randn(3, 7, K, generator=g), -1)
    one_hot = MixtureRecord.discrete(ids[..., 0], K)
    ours = mixture_embedding(emb, one_hot.mix_ids.to(DEV), one_hot.mix_weights.to(DEV))
    own = emb(ids[..., 0].to(DEV)).transpose(0, 1)
    record("mixture_embedding/one_hot_equals_embedding", float((ours - own).abs().max()), 0)
    table = emb.weight.detach().cpu()
    expected = (weights[..., None] * table[ids]).sum(-2).transpose(0, 1)
    got = mixture_embedding(emb, ids.to(DEV), weights.to(DEV)).cpu()
    record("mixture_embedding/soft_vs_cpu", float((got - expected).abs().max()), 1e-5)

    shard = VocabShard.whole(padded, 1000)
    # the engine's string automata; tokenizer files only, as benchmarks/gpu/prepare.sh writes them
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = [[5, 17, 999, 3, 42], [7, 8]]
    out = {}
    for cache in (True, False):
        settings = RolloutSettings(
            None, DiscreteSampler(Truncation.greedy(), K), 1.0, "\x00", 16, frozenset()
        )
        backend = MegatronBackend(model, parallel, use_kv_cache=cache)
        engine = RolloutEngine(model, tokenizer, shard, settings, parallel, backend)
        out[cache] = engine.generate(prompts, 1).records.tokens.cpu()
    record("rollout/kv_cache_equals_recompute_greedy", float((out[True] != out[False]).sum()), 0)
    # a group's rows copy its prompt's prefilled cache: as prefilling each row, with CUDA graphs
    from megatron_softgrpo.rollout.static_backend import StaticBackend

    backend = StaticBackend(model, parallel, cuda_graphs=True)
    engine = RolloutEngine(model, tokenizer, shard, settings, parallel, backend)
    shared = engine.generate(prompts, 3).records.tokens.cpu()
    alone = engine.generate([p for p in prompts for _ in range(3)], 1).records.tokens.cpu()
    record("rollout/shared_prompt_prefill_equals_per_row_greedy", float((shared != alone).sum()), 0)


def check_refit_bridge():
    from megatron_softgrpo.bridge import Bridge

    bridge = Bridge(torch.distributed.HashStore(), "refit", [0], 0, 60, torch.device(DEV))
    sent = torch.arange(1000, dtype=torch.bfloat16, device=DEV)
    got = bridge.broadcast(sent.clone(), src=0)
    header = bridge.broadcast_object(([("w", (1000,))], "torch.bfloat16"), src=0)
    diff = float((got.float() - sent.float()).abs().max()) + (header[1] != "torch.bfloat16")
    record(
        "refit/bridge_broadcasts_on_the_device", diff, 0, f"({'NCCL' if bridge._nccl else 'gloo'})"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--tokenizer", required=True, help="SmolLM2's tokenizer directory")
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEV, JSON_PATH, V, PADDED
    JSON_PATH = args.json
    if args.smoke_cpu:  # the same code paths at 1/38 of the width (chunks split positions only)
        DEV, V, PADDED = "cpu", 3_968, 4_096
    else:
        assert torch.cuda.is_available(), "needs a GPU"
    noisy, shard, logits = check_samplers()
    check_log_densities(noisy, shard, logits)
    check_model_path(args.tokenizer)
    check_refit_bridge()
    failed = [k for k, v in results.items() if not v["ok"]]
    print(
        f"{len(results) - len(failed)}/{len(results)} checks passed"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
