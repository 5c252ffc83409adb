"""Process-group and Megatron parallel-state initialisation from the launcher's environment.

One entry point, `init_distributed`, serves three launchers:
- a single process started by hand (world size 1, a free loopback port),
- `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
- Slurm `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host
  of SLURM_JOB_NODELIST and the port is derived from SLURM_JOB_ID, so every task agrees
  without talking to each other first).
gloo on CPU, NCCL on GPU. It returns a `ParallelState`, this rank's place in the job, which the
trainer, the policy worker, the rollout engines and the eval runner are handed; every collective
they run is a function of it here.

With dedicated generation ranks (`GenerationLayout`: the job's last ranks) the job has two
roles, each with a default world of its own (Megatron-Core builds its groups over the default
world), joined by three `Bridge`s: `control` (the training main rank and the generation ranks:
requests and refits), `results` (the generation ranks' first to the training main rank) and
`refit` (each training pipeline stage's first rank and the generation ranks: weights; NCCL
for tensors on GPUs). Each direction has its own, so neither side's send waits on the other's.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from megatron_softgrpo.bridge import Bridge
from megatron_softgrpo.errors import UserError


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "single" | "torchrun" | "slurm"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel)


@dataclass(frozen=True)
class GenerationLayout:
    """The job's last `ranks` ranks decode for the trainer on a copy of the model of their own,
    at tensor-parallel size `tensor_parallel` (policy.generation.colocated.enabled: false)."""

    ranks: int
    tensor_parallel: int = 1


@dataclass(frozen=True)
class Bridges:
    """The two roles' meeting points (see the module docstring), on both roles' ranks."""

    # None on a rank outside it. control: bridge rank 0 is the training main rank, then the
    # generation ranks; results: the generation ranks' first (0) and the training main rank
    # (1); refit: bridge ranks 0..PP-1 are the training stages' first ranks, then the
    # generation ranks
    control: Bridge | None
    results: Bridge | None
    refit: Bridge | None
    stages: int  # training pipeline stages (the refit's senders)


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the job: sizes, ranks and process groups of tensor (tp), pipeline (pp)
    and data (dp) parallelism. Our code is handed this object; Megatron-Core's model, DDP wrapper
    and schedules are handed its `groups`."""

    launch: LaunchEnv
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    dp: int
    dp_rank: int
    groups: Any  # Megatron-Core's ProcessGroupCollection, all its groups (.tp, .pp, .dp, ...)
    pp_prev_rank: int  # global ranks of the previous, next and last stage of this rank's pipeline
    pp_next_rank: int
    pp_last_rank: int
    cpu_group: Any  # the role's ranks, gloo even under NCCL: Python objects and small flags
    role: str = "train"  # "train" | "generation" (dedicated generation ranks)
    bridges: Bridges | None = None  # with dedicated generation ranks

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def main(self) -> bool:
        """Rank 0 of its role; the training one reads and writes the job's files and prints its
        progress."""
        return self.launch.rank == 0

    @property
    def replica_lead(self) -> bool:
        """The first rank of its model replica (TP and PP rank 0)."""
        return self.tp_rank == 0 and self.pp_rank == 0

    def layout(self) -> dict[str, int]:
        """What a checkpoint records of the layout it was saved at."""
        return {
            "tensor_parallel": self.tp,
            "pipeline_parallel": self.pp,
            "world_size": self.launch.world_size,
        }

    @classmethod
    def current(cls, launch: LaunchEnv, cpu_group, role: str = "train") -> ParallelState:
        """Read once from Megatron's initialised parallel_state (init_distributed's last step)."""
        from megatron.core import parallel_state as mpu
        from megatron.core.process_groups_config import ProcessGroupCollection

        return cls(
            launch,
            mpu.get_tensor_model_parallel_world_size(),
            mpu.get_tensor_model_parallel_rank(),
            mpu.get_pipeline_model_parallel_world_size(),
            mpu.get_pipeline_model_parallel_rank(),
            mpu.get_data_parallel_world_size(),
            mpu.get_data_parallel_rank(),
            ProcessGroupCollection.use_mpu_process_groups(),  # what GPTModel would fetch itself
            mpu.get_pipeline_model_parallel_prev_rank(),
            mpu.get_pipeline_model_parallel_next_rank(),
            mpu.get_pipeline_model_parallel_last_rank(),
            cpu_group,
            role,
        )


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-03,07]-ib,login1`` into host names."""
    hosts: list[str] = []
    for pattern in re.findall(
        r"(?:[^,\[]|\[[^\]]*\])+", nodelist
    ):  # split at commas outside brackets
        pieces = re.split(r"\[([^\]]*)\]", pattern)  # text, ranges, text, ..., text
        choices = [[text] if i % 2 == 0 else _expand_ranges(text) for i, text in enumerate(pieces)]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def _expand_ranges(ranges: str) -> list[str]:
    out: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        out.extend([lo] if not hi else [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)])
    return out


def slurm_master_port(job_id: int | str) -> int:
    """A port every task of a job derives alike; different jobs on one node rarely collide."""
    return (
        20000 + int(job_id) % 10000
    )  # 20000-29999: below the ephemeral ports (32768+) other sockets get


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or (value == "" and default is not None):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r}: expected an integer") from None


def detect_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read rank/world/master from torchrun or Slurm variables; fall back to one local process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return LaunchEnv(
            launcher="torchrun",
            rank=_int_var(environ, "RANK"),
            world_size=_int_var(environ, "WORLD_SIZE"),
            local_rank=_int_var(environ, "LOCAL_RANK", 0),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_var(environ, "MASTER_PORT", 29500),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        hosts = expand_hostlist(nodelist) if nodelist else []
        return LaunchEnv(
            launcher="slurm",
            rank=_int_var(environ, "SLURM_PROCID"),
            world_size=_int_var(environ, "SLURM_NTASKS"),
            local_rank=_int_var(environ, "SLURM_LOCALID", 0),
            master_addr=environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
            master_port=_int_var(environ, "MASTER_PORT", 0)
            or slurm_master_port(_int_var(environ, "SLURM_JOB_ID", 0)),
        )
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", _free_port())


def validate_layout(
    world_size: int, layout: ParallelLayout, generation: GenerationLayout | None = None
) -> None:
    """Refuse a layout the process count cannot hold (model-dependent rules: ModelArch.layout_problem)."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    if tp < 1 or pp < 1:
        raise UserError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    training = world_size
    if generation is not None:
        training -= generation.ranks
        if training < 1:
            raise UserError(
                f"{world_size} processes leave no training rank beside {generation.ranks} "
                "generation ranks (policy.generation.colocated.resources)"
            )
        if generation.ranks % generation.tensor_parallel:
            raise UserError(
                f"{generation.ranks} generation ranks cannot hold "
                f"policy.generation.tensor_model_parallel_size={generation.tensor_parallel}"
            )
    if training % (tp * pp):
        raise UserError(
            f"{training} training processes cannot hold TP*PP = {tp}*{pp} = {tp * pp}; TP*PP must divide it"
        )


def role_of(
    rank: int, world_size: int, generation: GenerationLayout | None
) -> tuple[str, int, int]:
    """(role, rank in the role's world, the role's world size) of a global rank: the last
    `generation.ranks` ranks generate. Launchers number ranks node by node (torchrun, Slurm's
    default block distribution), so whole generation nodes are the job's last nodes."""
    training = world_size - (generation.ranks if generation else 0)
    if rank < training:
        return "train", rank, training
    return "generation", rank - training, world_size - training


_CPU_GROUP = None
_BRIDGES = None


def init_distributed(
    layout: ParallelLayout,
    seed: int = 1234,
    timeout_minutes: int = 30,
    generation: GenerationLayout | None = None,
) -> ParallelState:
    """Initialise torch.distributed and Megatron's parallel_state (idempotent per process) for
    this rank's role: training at `layout`, or, on the last `generation.ranks` ranks, generation
    at TP `generation.tensor_parallel` (PP 1).

    Seeds the default generators and Megatron's model-parallel RNG tracker, so noise drawn
    inside `get_cuda_rng_tracker().fork()` is reproducible per tensor-parallel rank.
    """
    from megatron.core import parallel_state, tensor_parallel

    import model_patches

    model_patches.apply_all()
    env = detect_launch_env()
    validate_layout(env.world_size, layout, generation)
    role, role_rank, role_size = role_of(env.rank, env.world_size, generation)
    if role == "generation":
        layout = ParallelLayout(generation.tensor_parallel, 1)
    use_cuda = torch.cuda.is_available()
    global _CPU_GROUP, _BRIDGES
    store = None
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, _, _ = next(
            torch.distributed.rendezvous(
                f"tcp://{env.master_addr}:{env.master_port}",
                env.rank,
                env.world_size,
                timeout=timeout,
            )
        )
        torch.distributed.init_process_group(  # the role's own world
            backend="nccl" if use_cuda else "gloo",
            store=torch.distributed.PrefixStore(f"{role}/", store),
            rank=role_rank,
            world_size=role_size,
            timeout=timeout,
        )
    if _CPU_GROUP is None:
        _CPU_GROUP = (
            torch.distributed.new_group(backend="gloo")
            if use_cuda
            else torch.distributed.group.WORLD
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    launch = replace(env, rank=role_rank, world_size=role_size)
    state = ParallelState.current(launch, _CPU_GROUP, role)
    if generation is not None and _BRIDGES is None and store is not None:
        _BRIDGES = _bridges(store, state, env, generation.ranks, 60.0 * timeout_minutes)
    return replace(state, bridges=_BRIDGES)


def _bridges(store, state: ParallelState, env: LaunchEnv, generating: int, timeout_s: float):
    """The bridges (every rank of the job calls this once, after its role's initialisation).
    The training stages' first ranks are published on the store: the generation ranks cannot
    know Megatron's rank order."""
    key, global_rank = "roles/stage_leads", env.rank
    if state.role == "train":
        lead = (state.pp_rank, global_rank) if state.tp_rank == state.dp_rank == 0 else None
        leads = [None] * state.launch.world_size
        torch.distributed.all_gather_object(leads, lead, group=state.cpu_group)
        if state.main:
            store.set(key, json.dumps([rank for _, rank in sorted(x for x in leads if x)]))
    store.wait([key])
    stage_leads = json.loads(store.get(key))
    training = env.world_size - generating
    generators = list(range(training, env.world_size))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return Bridges(
        control=Bridge(store, "control", [0, *generators], global_rank, timeout_s)
        if global_rank == 0 or global_rank >= training
        else None,
        results=Bridge(store, "results", [training, 0], global_rank, timeout_s)
        if global_rank in (0, training)
        else None,
        refit=Bridge(store, "refit", [*stage_leads, *generators], global_rank, timeout_s, device)
        if global_rank in stage_leads or global_rank >= training
        else None,
        stages=len(stage_leads),
    )


# ------------------------------------------------------------------ collectives


def broadcast_from_last_stage(parallel: ParallelState, *tensors: torch.Tensor) -> None:
    """Give every pipeline stage the last stage's values (in place), e.g. the sampled step."""
    if parallel.pp == 1:
        return
    for t in tensors:
        if t.dtype == torch.bool:  # not every backend broadcasts bool
            wire = t.to(torch.uint8)
            torch.distributed.broadcast(wire, parallel.pp_last_rank, group=parallel.groups.pp)
            t.copy_(wire.bool())
        else:
            torch.distributed.broadcast(t, parallel.pp_last_rank, group=parallel.groups.pp)


def send_to_next_stage(parallel: ParallelState, x: torch.Tensor) -> None:
    torch.distributed.send(x.contiguous(), parallel.pp_next_rank)


def receive_from_previous_stage(parallel: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """`x` filled in place with what the previous pipeline stage sent."""
    torch.distributed.recv(x, parallel.pp_prev_rank)
    return x


def gather_data_parallel(parallel: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """Every data-parallel rank's `x`, concatenated along dim 0 in rank order (bool travels as uint8)."""
    if parallel.dp == 1:
        return x
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
    parts = [torch.empty_like(wire) for _ in range(parallel.dp)]
    torch.distributed.all_gather(parts, wire, group=parallel.groups.dp)
    out = torch.cat(parts)
    return out.bool() if x.dtype == torch.bool else out


def sum_data_parallel(parallel: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the data-parallel ranks, in place."""
    if parallel.dp > 1:
        torch.distributed.all_reduce(x, group=parallel.groups.dp)
    return x


def max_data_parallel_(parallel: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """`x` replaced by its elementwise maximum over the data-parallel ranks, in place."""
    if parallel.dp > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=parallel.groups.dp)
    return x


def max_data_parallel(parallel: ParallelState, value: int, device) -> int:
    """The largest `value` of any data-parallel rank."""
    if parallel.dp == 1:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=parallel.groups.dp)
    return int(t)


def barrier(parallel: ParallelState) -> None:
    """Wait until every rank of the job is here."""
    if parallel.launch.world_size > 1:
        torch.distributed.barrier(group=parallel.cpu_group)


def any_rank(parallel: ParallelState, flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank."""
    if parallel.launch.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=parallel.cpu_group)
    return bool(t.item())


def share_from_main(parallel: ParallelState, obj):
    """The main rank's Python object `obj`, on every rank."""
    if parallel.launch.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=parallel.cpu_group)
    return box[0]


def gather_to_main(parallel: ParallelState, items: list) -> list:
    """Every rank's list, concatenated in rank order on the main rank; [] elsewhere."""
    if parallel.launch.world_size == 1:
        return list(items)
    gathered = [None] * parallel.launch.world_size if parallel.main else None
    torch.distributed.gather_object(items, gathered, dst=0, group=parallel.cpu_group)
    return [x for part in gathered for x in part] if parallel.main else []


# ---------------------------------------------- tensor-parallel collectives (over a vocab shard)
# They take the TP group itself (`VocabShard.group`, `parallel.groups.tp`), so that the soft
# math need not know the ParallelState; None or a group of one is the identity. The two
# autograd-aware sums are Megatron's conjugate pair (reduce_from / copy_to_tensor_model_parallel
# _region): a loss computed alike on every TP rank gives each rank the gradient of its shard.


def _tensor_parallel(group) -> bool:
    return group is not None and group.size() > 1


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        total = x.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumGradsOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # (Megatron's copy_to_tensor_model_parallel_region would reduce a contiguous copy of a
        # non-contiguous gradient and return the unreduced original; reduce our own copy.)
        total = grad.contiguous().clone()
        torch.distributed.all_reduce(total, group=ctx.group)
        return total, None


def sum_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the TP ranks; backward is the identity (each rank owns its share of the sum)."""
    return _SumOverRanks.apply(x, group) if _tensor_parallel(group) else x


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward sums the TP ranks' partial gradients."""
    return _SumGradsOverRanks.apply(x, group) if _tensor_parallel(group) else x


def sum_tensor_parallel_(x: torch.Tensor, group) -> torch.Tensor:
    """`x` summed over the TP ranks in place, no autograd (a CUDA graph captures it)."""
    if _tensor_parallel(group):
        torch.distributed.all_reduce(x, group=group)
    return x


def max_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Element-wise max over the TP ranks (no autograd)."""
    if not _tensor_parallel(group):
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    return x


def gather_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Every TP rank's `x` concatenated along the last dimension, in rank order (no autograd)."""
    if not _tensor_parallel(group):
        return x
    parts = [torch.empty_like(x) for _ in range(group.size())]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def destroy_distributed() -> None:
    global _CPU_GROUP, _BRIDGES
    _CPU_GROUP = _BRIDGES = None
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if "model_patches" in sys.modules:  # Megatron's globals let go of the dropped models
        sys.modules["model_patches"].lifetime.forget()
