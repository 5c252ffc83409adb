"""Builders the test modules share: a PolicyWorker recipe on a tiny model and batches for it, a
`softgrpo train` recipe file, a rollout engine with its settings on a tiny SmolLM2-vocabulary
model, and the fixed-shape backend's engine with the comparison of two engines' records."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch

from megatron_softgrpo.batch import Batch
from megatron_softgrpo.config.schema import (
    CheckpointingCfg,
    GenerationCfg,
    LossCfg,
    MegatronCfg,
    OptimizerCfg,
    PolicyCfg,
    RecipeCfg,
    SchedulerCfg,
    SoftGRPOCfg,
)
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import resolve_model_source
from megatron_softgrpo.rollout.engine import RolloutEngine
from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.rollout.static_backend import BATCH_BUCKET, StaticBackend
from megatron_softgrpo.soft import (
    DiscreteSampler,
    GumbelNoise,
    MixtureRecord,
    SoftSampler,
    Truncation,
    VocabShard,
    seed_noise_rng,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 49152  # the rollout tests' tiny models have SmolLM2's vocabulary

# ------------------------------------------------------------------ the policy worker

K = 3  # mixture size
ANSWER_T = 0.7  # policy.generation.temperature: scores discrete positions
THINKING_T = 1.0  # softgrpo.thinking.temperature: scores soft positions


def recipe(
    hf_dir,
    tp=1,
    pp=1,
    *,
    micro=1,
    kl=0.001,
    aggregation="token_mean_microbatch",
    warmup=0,
    ckpt=None,
    keep=3,
    distributed=True,
    entropy=0.0,
    algorithm="softgrpo",
):
    return RecipeCfg(
        policy=PolicyCfg(
            model_name=str(hf_dir),
            precision="float32",
            train_micro_batch_size=micro,
            logprob_batch_size=micro,
            generation=GenerationCfg(temperature=ANSWER_T),
            megatron_cfg=MegatronCfg(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                # eps far above gradient rounding noise: some gradients are exactly 0 in exact arithmetic
                # (the key bias: softmax is shift-invariant) and ~1e-9 numerically, which Adam with
                # eps=1e-8 would turn into steps of ~lr that differ between layouts
                optimizer=OptimizerCfg(
                    lr=1e-3, adam_eps=1e-5, use_distributed_optimizer=distributed
                ),
                scheduler=SchedulerCfg(lr_warmup_iters=warmup),
            ),
        ),
        loss_fn=LossCfg(
            reference_policy_kl_penalty=kl, aggregation=aggregation, entropy_coef=entropy
        ),
        softgrpo=SoftGRPOCfg(algorithm=algorithm, mixture_size=K, multiplex_width=K),
        checkpointing=CheckpointingCfg(checkpoint_dir=str(ckpt), keep_top_k=keep)
        if ckpt
        else CheckpointingCfg(),
    )


def new_worker(cfg, tp=1, pp=1):
    """The recipe's worker, with `recipe_loss`: the loss the trainer would hand its updates."""
    from megatron_softgrpo.algorithms.loss import PolicyLoss
    from megatron_softgrpo.train.setup import build_worker

    worker = build_worker(cfg, init_distributed(ParallelLayout(tp, pp)))
    worker.recipe_loss = PolicyLoss(cfg.loss_fn)
    return worker


def mixture_logits64(hf_model, records):
    """[B, S, V] float64 logits of `transformers`' model fed the records' mixtures sum_k w_k E[ids_k]
    (docs/algorithm.md section 2): the independent reference the worker's scores are held to; the
    output at j - 1 scores record j."""
    import torch

    model = hf_model.double()
    table = model.get_input_embeddings().weight
    inputs = (records.mix_weights.double().unsqueeze(-1) * table[records.mix_ids]).sum(dim=2)
    with torch.no_grad():
        return model(inputs_embeds=inputs).logits


# ------------------------------------------------------------------ softgrpo train


# one-digit sums from reasoning-gym: graded on CPU in microseconds
TRAIN_DATA = {
    "kind": "reasoning_gym",
    "task": "basic_arithmetic",
    "size": 40,
    "seed": 1,
    "task_config": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
}


def write_recipe(tmp_path: Path, model: Path, tokenizer: Path, **sections) -> Path:
    run = tmp_path / "run"
    body = {
        "defaults": str(ROOT / "recipes" / "base.yaml"),
        "policy": {
            "model_name": str(model),
            "tokenizer": {"name": str(tokenizer)},
            "precision": "float32",
            "train_global_batch_size": 4,
            "train_micro_batch_size": 2,
            "logprob_batch_size": 2,
            "max_total_sequence_length": 256,
            "generation": {"max_new_tokens": 8},
            "megatron_cfg": {"optimizer": {"lr": 1e-4}},
        },
        "grpo": {
            "num_prompts_per_step": 2,
            "num_generations_per_prompt": 4,
            "max_num_steps": 4,
            "seed": 3,
        },
        "loss_fn": {"reference_policy_kl_penalty": 0.01},
        "data": {
            "max_input_seq_length": 128,
            "train": TRAIN_DATA,
        },
        "env": {"reward": "reasoning_gym", "num_workers": 1},
        "softgrpo": {"thinking": {"max_thinking_tokens": 4}},
        "logger": {"log_dir": str(run), "tensorboard_enabled": True},
        "checkpointing": {"checkpoint_dir": str(run / "ckpt"), "save_period": 2, "keep_top_k": 2},
        "cluster": {"gpus_per_node": 0},
    }
    for section, values in sections.items():
        body[section] = {**body.get(section, {}), **values}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


# ------------------------------------------------------------------ the rollout engine

PROMPTS = [[5, 17, 999, 3, 42], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8]]

EOS = 2


def build(tiny_dir, tp=1, pp=1):
    """(model, vocabulary shard, parallel state) of this rank."""
    parallel = init_distributed(ParallelLayout(tp, pp))
    model, padded = load_model(
        resolve_model_source(tiny_dir),
        MegatronCfg(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        parallel,
    )
    model.eval()
    return model, VocabShard.of_group(padded, VOCAB, parallel.groups.tp), parallel


def gumbel(scale=1.0, tau=0.1):
    return SoftSampler(Truncation(1.0, 5, 0.95), 5, GumbelNoise(tau=tau, scale=scale))


def settings(**overrides):
    base = dict(
        thinking_sampler=gumbel(),
        # a bounded support: an inverse-CDF draw over a near-flat 49k-token nucleus would flip on
        # the last-ulp logit differences between TP layouts, which the TP/PP test compares
        answer_sampler=DiscreteSampler(Truncation(1.0, top_k=20, top_p=0.9), 5),
        thinking_temperature=1.0,
        think_end="</think>",
        max_new_tokens=12,
        eos_ids=frozenset({EOS}),
    )
    return RolloutSettings(**{**base, **overrides})


def run(model, shard, parallel, tokenizer, prompts=PROMPTS, g=2, seed=7, backend=None, **overrides):
    """`backend(model, parallel)` builds the decode backend (None: Megatron's forward)."""
    seed_noise_rng(seed)
    backend = None if backend is None else backend(model, parallel)
    engine = RolloutEngine(model, tokenizer, shard, settings(**overrides), parallel, backend)
    return engine.generate(prompts, g)


def first_new_token(result, min_pos: int, exclude) -> tuple[int, int]:
    """(token, response position >= min_pos): the earliest sampled token that no row has produced
    before or at that position. Made an EOS id, it ends its row at that step, and nothing earlier
    changes (the random draws only change once a row leaves the batch)."""
    b = result.records.tokens.shape[0]
    seen = set()
    for t in range(int(result.response_lengths.max())):
        at_t = []
        for i in range(b):
            j = int(result.prompt_lengths[i]) + t
            if t < int(result.response_lengths[i]):
                at_t.append((int(result.records.tokens[i, j]), bool(result.loss_mask[i, j])))
        counts = [tok for tok, _ in at_t]
        for tok, scored in at_t:
            if (
                t >= min_pos
                and scored
                and tok not in exclude
                and tok not in seen
                and counts.count(tok) == 1
            ):
                return tok, t
        seen.update(counts)
    raise AssertionError("no fresh token to end a row with")


def staggered_eos(model, shard, parallel, tokenizer, marker, **kwargs) -> frozenset[int]:
    """EOS ids that end three rows at three different steps (found by re-running with each added)."""
    eos, pos = {EOS}, 0
    for _ in range(3):
        token, pos = first_new_token(
            run(model, shard, parallel, tokenizer, eos_ids=frozenset(eos), **kwargs),
            pos + 1,
            set(marker) | eos,
        )
        eos.add(token)
    return frozenset(eos)


# ------------------------------------------------------------------ rows ending at chosen steps
# (tests/test_static_gpu_paths.py and benchmarks/gpu/check_graphs.py)

SAMPLERS = {
    "greedy": dict(thinking_sampler=None, answer_sampler=DiscreteSampler(Truncation.greedy(), 5)),
    "gumbel": dict(thinking_sampler=gumbel()),
}


def response_tokens(result) -> list[list[int]]:
    return [
        result.records.tokens[i, p : p + n].tolist()
        for i, (p, n) in enumerate(
            zip(result.prompt_lengths.tolist(), result.response_lengths.tolist(), strict=True)
        )
    ]


def eos_ending_within(result, windows: list[tuple[int, int]]) -> frozenset[int] | None:
    """EOS ids that end row i after a number of steps in windows[i] = (first, last), taken from
    `result`, a run none of them ended; None if none found. A row's draws do not depend on the
    other rows (noise per (step, row)), so an EOS id only cuts the rows that write it: the
    lengths are simulated (and checked on the reference by the caller)."""
    rows = response_tokens(result)
    eos = set(settings().eos_ids)

    def lengths():
        return [next((t + 1 for t, x in enumerate(r) if x in eos), len(r)) for r in rows]

    def fits(upto):  # rows [0, upto) in their windows, none ended before its window
        n = lengths()
        return all(lo <= n[j] and (j >= upto or n[j] <= hi) for j, (lo, hi) in enumerate(windows))

    for i, (first, last) in enumerate(windows):
        for token in rows[i][first - 1 : last]:
            if fits(i + 1):
                break
            if token not in eos:
                eos.add(token)
                if not fits(i):
                    eos.discard(token)
    return frozenset(eos) if fits(len(rows)) else None


def rescoring_recipe(tiny_dir, algorithm):
    cfg = recipe(tiny_dir, kl=0)  # answer temperature 0.7
    # thinking temperature 1.3 != 0.7: each row must be scored at its own phase's temperature
    thinking = cfg.softgrpo.thinking.model_copy(
        update={"temperature": 1.3, "max_thinking_tokens": 3}
    )
    return cfg.model_copy(
        update={
            "softgrpo": cfg.softgrpo.model_copy(
                update={"algorithm": algorithm, "mixture_size": 5, "thinking": thinking}
            )
        }
    )


# ------------------------------------------------------------------ policy worker batches

TINY_VOCAB = 1000  # tiny_models' real vocabulary (padded to 1024)


def make_batch(seed: int, rows: int = 4, seq: int = 12) -> Batch:
    """Right-padded rows of different lengths: a discrete prompt, then soft and discrete steps."""
    g = torch.Generator().manual_seed(seed)
    records = MixtureRecord.discrete(torch.randint(0, TINY_VOCAB, (rows, seq), generator=g), K)
    loss_mask = torch.zeros(rows, seq, dtype=torch.bool)
    for b in range(rows):
        prompt, length = 3 + b % 2, seq - b % 3
        loss_mask[b, prompt:length] = True
        for j in range(length, seq):  # right padding: zero records
            for f in ("tokens", "mix_ids", "mix_weights", "noise", "support"):
                getattr(records, f)[b, j] = 0
        for j in range(prompt, length):
            if torch.rand((), generator=g) < 0.5:
                continue  # a discrete step
            ids = torch.randperm(TINY_VOCAB, generator=g)[:K]
            support = torch.arange(K) < int(torch.randint(1, K + 1, (), generator=g))
            noise = torch.where(support, torch.randn(K, generator=g) * 2 - 2, torch.zeros(K))
            weights = torch.softmax((noise / 0.1).masked_fill(~support, -math.inf), dim=-1)
            (
                records.mix_ids[b, j],
                records.support[b, j],
                records.noise[b, j],
                records.mix_weights[b, j],
            ) = ids, support, noise, weights
            records.tokens[b, j], records.is_soft[b, j] = ids[0], True
    advantages = torch.randn(rows, 1, generator=g) * loss_mask
    return Batch(records, loss_mask, advantages=advantages)


def with_old_logprobs(worker, batch: Batch) -> Batch:
    batch.old_logp = worker.compute_logprobs(batch)
    if worker.reference is not None:
        batch.ref_logp = worker.compute_logprobs(batch, reference=True)
    return batch


def sharded_pieces(model) -> list[tuple]:
    """(key, global shape, global offset, prepended axes, data) of every tensor this rank holds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return [
        (t.key, t.global_shape, t.global_offset, t.prepend_axis_num, t.data.detach().clone())
        for t in nested_values(sd)
        if isinstance(t, ShardedTensor)
    ]


def assemble(per_rank_pieces) -> dict[str, torch.Tensor]:
    """The full (layout-independent) tensors from every rank's pieces."""
    full: dict[str, torch.Tensor] = {}
    for pieces in per_rank_pieces:
        for key, shape, offset, prepend, data in pieces:
            t = full.setdefault(key, torch.full(shape, math.nan))
            index = tuple(offset[:prepend]) + tuple(
                slice(o, o + n) for o, n in zip(offset[prepend:], data.shape)
            )
            t[index] = torch.as_tensor(data)
    for key, t in full.items():
        assert not t.isnan().any(), f"{key}: not covered by the ranks' shards"
    return full


# ------------------------------------------------------------------ the fixed-shape backend


def build64(tiny_dir, tp=1, pp=1):
    model, shard, parallel = build(tiny_dir, tp, pp)
    return model.double(), shard, parallel


def static_engine(
    model, tokenizer, shard, s, parallel, row_bucket=BATCH_BUCKET, compile=False, **kwargs
):
    """The engine on the fixed-shape backend, with the row buckets of a GPU's graphs (on the CPU
    an eager step's own default is 1); `compile`: its token steps replayed compiled."""
    backend = StaticBackend(model, parallel, compile, row_bucket=row_bucket)
    return RolloutEngine(model, tokenizer, shard, s, parallel, backend, **kwargs)


def assert_same_records(a, b, atol=1e-6):
    """Identical ids, flags, lengths and texts; float records within rounding (the sampler
    reduces another number of rows than the reference: fp32 sums in another order)."""
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "records":
            for name in ("tokens", "mix_ids", "support", "is_soft", "noise_seed", "thinking"):
                assert torch.equal(getattr(x, name), getattr(y, name)), name
            for name in ("mix_weights", "noise"):
                torch.testing.assert_close(getattr(y, name), getattr(x, name), atol=atol, rtol=1e-5)
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            torch.testing.assert_close(y, x, atol=atol, rtol=1e-5)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name
