"""`softgrpo plan`: the per-GPU memory of a recipe's parallel layout, from the architecture alone.

A training step runs three phases one after another on the same GPUs; what one phase
allocates is freed before the next, so the peak of a pipeline stage is

    peak = resident + max(rollout, old/ref log-probs, update)

Notation: h hidden, a / g attention / key-value heads, d head dim, f FFN size, L layers
(L_s = L / PP on a stage), V the padded vocabulary, t = TP, D bytes per element of
`policy.precision` (2 for bf16), s = policy.max_total_sequence_length, b the micro-batch.

resident (whole run)
- weights: P_s x D; P_s = this GPU's parameters: L_s layers / t (norm weights replicated),
  the vocabulary-parallel embedding (V/t x h) on the first stage, the output layer (V/t x h,
  also for tied embeddings when PP > 1) and the final norm on the last stage.
- gradients: P_s x 4 (Megatron DDP keeps fp32 main gradients, grad_reduce_in_fp32).
- optimizer: P_s x 12 / DP (distributed optimizer: fp32 master copy + Adam's two moments,
  sharded over data-parallel ranks; 8 B without a master copy in fp32; no / DP when the
  optimizer is not distributed).
- reference model: P_s x D, only when loss_fn.reference_policy_kl_penalty > 0.
- overhead: a fixed OVERHEAD_GIB (CUDA context, NCCL and cuBLAS workspaces, fragmentation).

rollout (each DP rank decodes R = prompts per step / DP x G rows at once, or whole groups of
at most policy.generation.max_rows_per_pass rows per pass)
- KV cache: 2 x L_s x (g/t) x d x R x (data.max_input_seq_length + max_new_tokens) x D,
  what Megatron's StaticInferenceContext allocates for this stage's layers.
- step tensors: the records and noise tapes of R + 1 rows x max_new_tokens, (27 + 21K) B each.
  A training rank frees both after its rollout (the update needs the memory); a dedicated
  generation rank keeps them, and the CUDA graphs captured on them, from one rollout to the next.
- working memory: one layer of the prefill (R x prompt x (2h + ((a + 2g) d + m f)/t) x D),
  a copy of one layer's cache (finished rows are compacted), on the last stage the
  sampling logits (R x V/t x 4 B x 4 copies).

old/ref log-probs (forward only, micro-batches of policy.logprob_batch_size rows)
- one layer's activations (below) for those rows, the stage's output hidden states, and
  on the last stage one chunk of logits: chunk x V/t x (D + 8) B.

update (1F1B pipeline schedule: stage i holds min(PP - i, micro-batches) in flight)
- activations per layer and token, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models") applied to a SwiGLU / GQA block without
  dropout: D x (n h [/t with sequence parallelism] + (2ad + 2kd + m f)/t):
  n h: the two norms' inputs and outputs (n = 4; 6 under the local spec, whose torch RMSNorm
  also keeps x / rms); q, the attention output, k and v (k = a: the SDPA core attention of
  both specs expands the g key/value heads); m f for SwiGLU
  (m = 3 fused: the 2f input and the f product; m = 5 unfused, which also keeps silu's output
  and its linear half: policy.megatron_cfg.bias_activation_fusion=false, the recipes' setting).
  No s x s attention scores are kept (torch SDPA core attention in both specs,
  model_patches/sdpa_attention.py). The last stage adds the
  final norm (h; 2h local). With full recompute (policy.megatron_cfg.activation_checkpointing)
  only each layer's input (s b h D [/t]) is kept and one layer is recomputed at a time. One
  more layer covers the gradients in flight.
- chunked log-prob working memory (last stage, soft/logprob.py): one chunk of recomputed
  logits in D, their fp32 softmax and D gradient (chunk x V/t x (4 + 2D)), the fp32
  output-weight gradient (V/t x h x 4) and the fp32 hidden gradient (b s h x 4).
- the batch records (every rank holds the whole step's batch): responses x s x (34 + 17K) B.

FP8 (Transformer Engine) is counted as bf16: an upper bound (FP8 only narrows GEMM inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_softgrpo.algorithms.registry import training_algorithm
from megatron_softgrpo.config.checks import cluster_world_size, validate
from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch
from megatron_softgrpo.soft.logprob import DEFAULT_CHUNK_SIZE
from megatron_softgrpo.train.refit import BUCKET_BYTES as REFIT_BUCKET_BYTES

GIB = 2**30
OVERHEAD_GIB = 5.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAMPLING_LOGIT_COPIES = 4  # fp32 logits and the sampler's temporaries (scaled, sorted, masked)
FP32 = 4

RESIDENT, ROLLOUT, LOGPROB, UPDATE, REFIT = "resident", "rollout", "logprob", "update", "refit"
TRANSIENT_PHASES = (ROLLOUT, LOGPROB, UPDATE, REFIT)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Workload:
    """What one training step asks of each GPU, from the recipe."""

    dtype_bytes: int
    micro_batch: int
    seq_len: int  # training rows are padded to at most policy.max_total_sequence_length
    micro_batches: int  # per DP rank per optimizer step
    logprob_batch: int
    rollout_rows: int  # decoded at once by one DP rank
    generation_rows: int  # decoded at once by one dedicated generation replica (if any)
    rollout_prompt_len: int
    rollout_len: int  # prompt + max_new_tokens: the KV cache length
    batch_rows: int  # responses per step, held by every rank
    mixture_size: int
    padded_vocab: int
    sequence_parallel: bool
    te_spec: bool  # transformer_impl: transformer_engine (fused norm + linear layers)
    fused_swiglu: bool  # policy.megatron_cfg.bias_activation_fusion
    recompute: bool
    reference_model: bool
    distributed_optimizer: bool
    master_weights: bool  # a separate fp32 copy (bf16/fp16 training)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    refits_waiting: int = 1  # dedicated generation: refits received ahead of their requests

    @classmethod
    def from_recipe(cls, cfg: RecipeCfg, arch: ModelArch, layout: Layout) -> Workload:
        policy, mcfg, grpo = cfg.policy, cfg.policy.megatron_cfg, cfg.grpo
        return cls(
            dtype_bytes=DTYPE_BYTES[policy.precision],
            micro_batch=policy.train_micro_batch_size,
            seq_len=policy.max_total_sequence_length,
            micro_batches=policy.train_global_batch_size
            // (layout.dp * policy.train_micro_batch_size),
            logprob_batch=policy.logprob_batch_size,
            rollout_rows=rollout_rows_per_pass(cfg, layout.dp),
            # more replicas than training blocks decode a block in parts
            generation_rows=rollout_rows_per_pass(
                cfg, max(layout.dp, cfg.policy.generation_replicas())
            ),
            rollout_prompt_len=cfg.data.max_input_seq_length,
            rollout_len=cfg.data.max_input_seq_length + policy.generation.max_new_tokens,
            batch_rows=grpo.num_prompts_per_step * grpo.num_generations_per_prompt,
            mixture_size=training_algorithm(cfg.softgrpo).width(cfg.softgrpo),  # record slots
            padded_vocab=arch.padded_vocab_size(mcfg.make_vocab_size_divisible_by),
            sequence_parallel=mcfg.sequence_parallel,
            te_spec=mcfg.transformer_impl == "transformer_engine",
            fused_swiglu=mcfg.bias_activation_fusion,
            recompute=mcfg.activation_checkpointing,
            reference_model=cfg.loss_fn.reference_policy_kl_penalty > 0,
            distributed_optimizer=mcfg.optimizer.use_distributed_optimizer,
            master_weights=policy.precision != "float32",
            # the trainer runs up to the trajectory-age bound ahead, each request after a refit
            refits_waiting=max(
                1, grpo.async_grpo.max_trajectory_age_steps * grpo.async_grpo.enabled
            ),
        )


def rollout_rows_per_pass(cfg: RecipeCfg, dp: int) -> int:
    """Rows one DP rank decodes at once: its share of the step, or whole groups of at most
    policy.generation.max_rows_per_pass rows (what RolloutEngine.generate does)."""
    g = cfg.grpo.num_generations_per_prompt
    prompts = cfg.grpo.num_prompts_per_step // dp
    limit = cfg.policy.generation.max_rows_per_pass
    return g * (prompts if limit is None else min(prompts, max(1, limit // g)))


@dataclass(frozen=True)
class MemoryItem:
    name: str
    phases: tuple[str, ...]
    bytes: int
    formula: str


@dataclass(frozen=True)
class StagePlan:
    stage: int
    items: tuple[MemoryItem, ...]

    def phase_bytes(self, phase: str) -> int:
        return sum(item.bytes for item in self.items if phase in item.phases)

    @property
    def peak(self) -> int:
        return self.phase_bytes(RESIDENT) + max(self.phase_bytes(p) for p in TRANSIENT_PHASES)


@dataclass(frozen=True)
class Plan:
    params: int
    layout: Layout
    workload: Workload
    stages: tuple[StagePlan, ...]
    gpu_mem_bytes: int
    generation: StagePlan | None = None  # one dedicated generation rank
    generation_tp: int = 1
    generation_ranks: int = 0

    @property
    def fullest(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        gen = 0 if self.generation is None else self.generation.peak
        return max(self.fullest.peak, gen) <= self.gpu_mem_bytes


# ------------------------------------------------------------------ parameters


def layer_parameters(arch: ModelArch, tp: int) -> int:
    """One decoder layer's parameters on one TP rank (the two norm weights are replicated)."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    sharded = h * (q + 2 * kv) + (q + 2 * kv if arch.qkv_bias else 0) + q * h + 3 * h * f
    return sharded // tp + 2 * h


def stage_parameters(arch: ModelArch, tp: int, pp: int, stage: int, padded_vocab: int) -> int:
    """Parameters held by one GPU of pipeline stage `stage`."""
    h = arch.hidden_size
    vocab_shard = padded_vocab // tp * h
    total = arch.num_layers // pp * layer_parameters(arch, tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        total += vocab_shard  # word embeddings
    if last:
        total += h  # final norm
        if not arch.tie_word_embeddings or not first:
            total += vocab_shard  # output layer (a synchronised copy of the embeddings when tied and PP > 1)
    return total


# ------------------------------------------------------------------ activations


def swiglu_factor(fused: bool) -> int:
    """SwiGLU activations per token in units of f: the 2f input and the f product; unfused also
    silu's output and the linear half (Megatron's glu adds glu_linear_offset, a new tensor)."""
    return 3 if fused else 5


def norm_factor(te_spec: bool) -> int:
    """What an RMSNorm and the projection after it keep, in units of h: input and normed output;
    torch's RMSNorm (local spec) keeps x / rms as well."""
    return 2 if te_spec else 3


def layer_activation_bytes_per_token(arch: ModelArch, tp: int, w: Workload) -> float:
    """Activations one layer keeps for its backward, per token."""
    h, hd = arch.hidden_size, arch.head_dim
    replicated = 2 * norm_factor(w.te_spec) * h / (tp if w.sequence_parallel else 1)
    mlp = swiglu_factor(w.fused_swiglu) * arch.ffn_hidden_size
    sharded = 4 * arch.num_attention_heads * hd + mlp  # q, output, and k, v expanded to every head
    return w.dtype_bytes * (replicated + sharded / tp)


def prefill_mask_bytes(w: Workload) -> int:
    """The prefill's [rows, 1, p, p] padding mask: bool, and its additive copy in D (one for all layers)."""
    return w.rollout_rows * w.rollout_prompt_len**2 * (1 + w.dtype_bytes)


def kv_cache_bytes(
    arch: ModelArch, tp: int, layers: int, rows: int, length: int, dtype_bytes: int
) -> int:
    """Keys and values of `layers` layers for `rows` sequences of `length` positions."""
    return (
        2 * layers * (arch.num_key_value_heads // tp) * arch.head_dim * rows * length * dtype_bytes
    )


def in_flight_micro_batches(layout: Layout, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under the 1F1B schedule."""
    return min(layout.pp - stage, micro_batches)


# ------------------------------------------------------------------ the plan


class _Items:
    """Collects one stage's memory items."""

    def __init__(self):
        self.items: list[MemoryItem] = []

    def add(self, name: str, phases: tuple[str, ...], nbytes: float, formula: str) -> None:
        self.items.append(MemoryItem(name, phases, int(math.ceil(nbytes)), formula))


def _resident(out: _Items, w: Workload, dp: int | None, params: int) -> None:
    """A training rank's (`dp`: its data-parallel size) or, dp None, a generation rank's copy
    of the model: weights only, no gradients, optimizer or reference model."""
    D = w.dtype_bytes
    out.add("weights", (RESIDENT,), params * D, f"{params:,} params x {D} B")
    if dp is not None:
        _training_state(out, w, dp, params)
    out.add(
        "overhead",
        (RESIDENT,),
        OVERHEAD_GIB * GIB,
        "CUDA context, NCCL/cuBLAS workspaces, fragmentation",
    )


def _training_state(out: _Items, w: Workload, dp: int, params: int) -> None:
    D = w.dtype_bytes
    out.add("gradients", (RESIDENT,), params * FP32, f"{params:,} x 4 B (fp32 main grads)")
    state = 12 if w.master_weights else 8
    shards = dp if w.distributed_optimizer else 1
    out.add(
        "optimizer state",
        (RESIDENT,),
        params * state / shards,
        f"{params:,} x {state} B / DP {shards} ({'fp32 master + ' if w.master_weights else ''}2 Adam moments)",
    )
    if w.reference_model:
        out.add("reference model", (RESIDENT,), params * D, f"{params:,} x {D} B (KL penalty > 0)")


def _rollout(
    out: _Items, arch: ModelArch, w: Workload, tp: int, layers: int, last: bool, kept: bool
) -> None:
    """`kept`: the cache and step tensors stay from one rollout to the next (a generation rank)."""
    D, rows, prompt = w.dtype_bytes, w.rollout_rows, w.rollout_prompt_len
    kv = kv_cache_bytes(arch, tp, layers, rows, w.rollout_len, D)
    kept = (RESIDENT,) if kept else (ROLLOUT,)
    out.add(
        "rollout KV cache",
        kept,
        kv,
        f"2 x {layers} layers x {arch.num_key_value_heads // tp} kv heads x "
        f"{arch.head_dim} x {rows} rows x {w.rollout_len} x {D} B",
    )
    new, per = w.rollout_len - prompt, 27 + 21 * w.mixture_size
    out.add(
        "rollout step tensors",
        kept,
        (rows + 1) * new * per,
        f"{rows + 1} rows x {new} new tokens x {per} B (records, noise tapes)",
    )
    q_kv = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim
    mlp = swiglu_factor(w.fused_swiglu) * arch.ffn_hidden_size
    working = rows * prompt * (2 * arch.hidden_size + (q_kv + mlp) / tp) * D + kv / layers
    working += prefill_mask_bytes(w)
    what = (
        f"one prefill layer ({rows} x {prompt} tokens, its padding mask) + one layer's cache copy"
    )
    if last:
        vocab_shard = w.padded_vocab // tp
        working += rows * vocab_shard * FP32 * SAMPLING_LOGIT_COPIES
        what += f" + {rows} x {vocab_shard} x 4 B x {SAMPLING_LOGIT_COPIES} sampling logits"
    out.add("rollout working memory", (ROLLOUT,), working, what)


def _logprob(out: _Items, arch: ModelArch, w: Workload, tp: int, last: bool) -> None:
    """Old/reference log-probs: forward only, so one layer's activations at a time."""
    D, tokens = w.dtype_bytes, w.logprob_batch * w.seq_len
    nbytes = tokens * (layer_activation_bytes_per_token(arch, tp, w) + arch.hidden_size * D)
    what = f"one layer for {w.logprob_batch} x {w.seq_len} tokens"
    if last:
        chunk, vocab_shard = min(w.chunk_size, tokens), w.padded_vocab // tp
        nbytes += chunk * vocab_shard * (D + 2 * FP32)
        what += f" + {chunk} x {vocab_shard} logits x {D + 2 * FP32} B"
    out.add("log-prob forward", (LOGPROB,), nbytes, what)


def stored_activation_bytes(
    arch: ModelArch, w: Workload, tp: int, layers: int, in_flight: int, last: bool
) -> float:
    """What the forward of `in_flight` micro-batches keeps for their backward on one stage."""
    D, h = w.dtype_bytes, arch.hidden_size
    tokens = w.micro_batch * w.seq_len
    sp = tp if w.sequence_parallel else 1
    final_norm = (
        tokens * (norm_factor(w.te_spec) - 1) * h * D / sp if last else 0
    )  # no projection after it
    if w.recompute:
        return in_flight * (layers * tokens * h * D / sp + final_norm)  # each layer's input
    return in_flight * (
        layers * tokens * layer_activation_bytes_per_token(arch, tp, w) + final_norm
    )


def backward_working_bytes(arch: ModelArch, w: Workload, tp: int) -> float:
    """Beyond the stored activations, during the backward: the gradients of one layer's
    activations, plus the recomputed layer under full recompute."""
    one_layer = w.micro_batch * w.seq_len * layer_activation_bytes_per_token(arch, tp, w)
    return (2 if w.recompute else 1) * one_layer


def _update(
    out: _Items, arch: ModelArch, w: Workload, layout: Layout, stage: int, layers: int, last: bool
) -> None:
    D, tp, h = w.dtype_bytes, layout.tp, arch.hidden_size
    tokens = w.micro_batch * w.seq_len
    in_flight = in_flight_micro_batches(layout, stage, w.micro_batches)
    kept = (
        "layer inputs"
        if w.recompute
        else f"layers x {layer_activation_bytes_per_token(arch, tp, w) / D:,.0f} x {D} B/token"
    )
    out.add(
        "activations",
        (UPDATE,),
        stored_activation_bytes(arch, w, tp, layers, in_flight, last)
        + backward_working_bytes(arch, w, tp),
        f"{in_flight} in flight x {layers} {kept} + backward working memory; "
        f"{tokens} tokens per micro-batch",
    )
    if last:
        chunk, vocab_shard = min(w.chunk_size, tokens), w.padded_vocab // tp
        out.add(
            "log-prob chunk (fwd+bwd)",
            (UPDATE,),
            chunk * vocab_shard * (FP32 + 2 * D) + vocab_shard * h * FP32 + tokens * h * FP32,
            f"{chunk} x {vocab_shard} x {FP32 + 2 * D} B + fp32 output-weight and hidden grads",
        )
    record = 34 + 17 * w.mixture_size
    out.add(
        "batch records",
        (LOGPROB, UPDATE),
        w.batch_rows * w.seq_len * record,
        f"{w.batch_rows} rows x {w.seq_len} x {record} B",
    )


def stage_plan(
    arch: ModelArch, w: Workload, layout: Layout, stage: int, dedicated: bool = False
) -> StagePlan:
    """Every memory item of one GPU of pipeline stage `stage` (`dedicated`: generation ranks
    decode, and this stage's first GPU sends them its weights instead)."""
    layers = arch.num_layers // layout.pp
    last = stage == layout.pp - 1
    out = _Items()
    _resident(
        out, w, layout.dp, stage_parameters(arch, layout.tp, layout.pp, stage, w.padded_vocab)
    )
    if dedicated:
        out.add(
            "refit bucket (send)",
            (REFIT,),
            2 * REFIT_BUCKET_BYTES,
            "the gathered full tensors of one bucket and their packed copy",
        )
    else:
        _rollout(out, arch, w, layout.tp, layers, last, kept=False)
    _logprob(out, arch, w, layout.tp, last)
    _update(out, arch, w, layout, stage, layers, last)
    return StagePlan(stage, tuple(out.items))


def generation_plan(arch: ModelArch, w: Workload, tp: int) -> StagePlan:
    """One dedicated generation rank: its copy of the model (TP `tp`, PP 1, no gradients or
    optimizer), `w.generation_rows` decoded at a time, and the refits received while it decodes:
    a bucket, and the shards of each refit waiting for its request."""
    w = replace(w, rollout_rows=w.generation_rows)
    out = _Items()
    params = stage_parameters(arch, tp, 1, 0, w.padded_vocab)
    _resident(out, w, None, params)
    _rollout(out, arch, w, tp, arch.num_layers, last=True, kept=True)
    out.add(
        "refit bucket (receive)", (ROLLOUT, REFIT), REFIT_BUCKET_BYTES, "one bucket of full tensors"
    )
    out.add(
        "refits waiting",
        (ROLLOUT, REFIT),
        w.refits_waiting * params * w.dtype_bytes,
        f"{w.refits_waiting} x its weights (NCCL: on the GPU)",
    )
    return StagePlan(0, tuple(out.items))


def plan_memory(
    arch: ModelArch,
    workload: Workload,
    layout: Layout,
    gpu_mem_gib: float,
    generation_ranks: int = 0,
    generation_tp: int = 1,
) -> Plan:
    """The training ranks' plan, and with `generation_ranks` dedicated ones, theirs."""
    dedicated = generation_ranks > 0
    stages = tuple(stage_plan(arch, workload, layout, s, dedicated) for s in range(layout.pp))
    generation = generation_plan(arch, workload, generation_tp) if dedicated else None
    return Plan(
        arch.num_parameters(),
        layout,
        workload,
        stages,
        int(gpu_mem_gib * GIB),
        generation,
        generation_tp,
        generation_ranks,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan, arch: ModelArch, recipe: str, cfg: RecipeCfg) -> str:
    lay, w = plan.layout, plan.workload
    mcfg = cfg.policy.megatron_cfg
    fullest = plan.fullest
    fp8 = mcfg.fp8_cfg
    lines = [
        f"recipe: {recipe}",
        f"model: {arch.model_type}, {arch.num_layers} layers, hidden {arch.hidden_size}, heads {arch.num_attention_heads}/"
        f"{arch.num_key_value_heads} kv, ffn {arch.ffn_hidden_size}, vocab {arch.vocab_size} (padded {w.padded_vocab}), "
        f"{'tied' if arch.tie_word_embeddings else 'untied'} embeddings",
        f"params: {plan.params}",
        f"layout: TP {lay.tp} x PP {lay.pp} x DP {lay.dp} = {lay.world_size} GPUs; micro-batch {w.micro_batch}, "
        f"{w.micro_batches} micro-batches per optimizer step per DP rank; {w.rollout_rows} rollout rows per DP rank",
        f"precision: {cfg.policy.precision}"
        + (
            f", FP8 {fp8.fp8}/{fp8.fp8_recipe} decoder GEMMs (counted as bf16)"
            if fp8.enabled
            else ""
        )
        + f"; layers: {'Transformer Engine' if w.te_spec else 'local'} spec, torch SDPA attention"
        + f"; recompute: {'full' if w.recompute else 'none'}; sequence parallel: {'on' if w.sequence_parallel else 'off'}",
        f"per-GPU memory of pipeline stage {fullest.stage} "
        f"({'the only stage' if lay.pp == 1 else f'the fullest of {lay.pp}'}), GiB:",
        f"  {'item':<26} {'phase':<16} {'GiB':>8}  formula",
    ]
    lines += _stage_lines(fullest)
    if lay.pp > 1:
        lines.append(
            "stage totals: " + ", ".join(f"{s.stage}: {_gib(s.peak)}" for s in plan.stages) + " GiB"
        )
    peak = fullest.peak
    if plan.generation is not None:
        lines.append(
            f"per-GPU memory of a generation rank ({plan.generation_ranks} at TP "
            f"{plan.generation_tp}, PP 1; {w.generation_rows} rows at a time), GiB:"
        )
        lines += _stage_lines(plan.generation)
        peak = max(peak, plan.generation.peak)
    lines.append(
        f"gpu memory: {_gib(plan.gpu_mem_bytes)} GiB (headroom {_gib(plan.gpu_mem_bytes - peak)} GiB)"
    )
    lines.append(f"fits: {'yes' if plan.fits else 'no'}")
    return "\n".join(lines)


def _stage_lines(stage: StagePlan) -> list[str]:
    """One line per memory item, then the peak as resident + the largest phase (of those with
    items)."""
    lines = [
        f"  {i.name:<26} {'+'.join(i.phases):<16} {_gib(i.bytes):>8}  {i.formula}"
        for i in stage.items
    ]
    phases = [p for p in TRANSIENT_PHASES if any(p in item.phases for item in stage.items)]
    largest = ", ".join(f"{p} {_gib(stage.phase_bytes(p))}" for p in phases)
    resident = _gib(stage.phase_bytes(RESIDENT))
    return [*lines, f"total: {_gib(stage.peak)} GiB = resident {resident} + max({largest})"]


def run_plan(
    recipe: str, overrides: list[str], gpus: int | None = None, gpu_mem_gib: float | None = None
) -> int:
    """Validate the recipe's layout and print its memory plan; 0 fits, 1 does not fit (UserError: 2)."""
    if gpus is not None and gpus < 1:
        raise UserError(f"plan: --gpus {gpus}: expected at least 1")
    if gpu_mem_gib is not None and gpu_mem_gib <= 0:
        raise UserError(f"plan: --gpu-mem-gib {gpu_mem_gib}: expected a positive size")
    loaded = load_recipe(recipe, overrides)
    cfg = loaded.cfg
    mcfg = cfg.policy.megatron_cfg
    tp, pp = mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size
    generating = cfg.policy.generation.generation_ranks()
    # CPU recipes (gpus_per_node: 0) plan one model replica unless --gpus says otherwise
    world = gpus or cluster_world_size(cfg.cluster) or tp * pp + generating
    arch = validate(loaded, world, training=True)
    layout = Layout(tp, pp, (world - generating) // (tp * pp))
    plan = plan_memory(
        arch,
        Workload.from_recipe(cfg, arch, layout),
        layout,
        gpu_mem_gib or cfg.cluster.gpu_mem_gib,
        generating,
        cfg.policy.generation_tensor_parallel(),
    )
    print(format_plan(plan, arch, recipe, cfg))
    return 0 if plan.fits else 1
