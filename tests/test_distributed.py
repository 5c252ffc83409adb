"""Launcher detection (single process, torchrun, Slurm) and layout checks."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_softgrpo.distributed import (
    ParallelLayout,
    detect_launch_env,
    expand_hostlist,
    init_distributed,
    slurm_master_port,
    validate_layout,
)
from megatron_softgrpo.errors import UserError


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[08-10,12],login5", ["gpu08", "gpu09", "gpu10", "gpu12", "login5"]),
        ("a[1,3],b[7-8]", ["a1", "a3", "b7", "b8"]),
        ("dgx-h100-[001-002]", ["dgx-h100-001", "dgx-h100-002"]),
        ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
        ("a[1-2]b[3-4],c", ["a1b3", "a1b4", "a2b3", "a2b4", "c"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_torchrun_environment():
    env = detect_launch_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "10.0.0.7",
            "MASTER_PORT": "29511",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 5, 8, 1)
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 29511)


def test_slurm_environment_derives_master_from_job():
    slurm = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    env = detect_launch_env(slurm)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 9, 16, 1)
    assert env.master_addr == "gpu07"  # the first host of the job
    assert env.master_port == slurm_master_port("123456") == 20000 + 123456 % 10000
    # every task of the job derives the same master, whatever its rank
    assert (
        detect_launch_env({**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port
        == env.master_port
    )
    # an explicit MASTER_ADDR/PORT (e.g. exported by the sbatch script) wins
    env = detect_launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("head", 4000)


@pytest.mark.parametrize(
    "var, value", [("MASTER_PORT", "notaport"), ("SLURM_JOB_ID", "12a"), ("SLURM_PROCID", "")]
)
def test_malformed_launcher_variables_are_one_line_errors(var, value):
    slurm = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "gpu1",
        "SLURM_JOB_ID": "7",
    }
    with pytest.raises(
        UserError, match=f"environment variable {var}='{value}': expected an integer"
    ):
        detect_launch_env({**slurm, var: value})


def test_single_process_without_launcher():
    env = detect_launch_env({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == (
        "single",
        0,
        1,
        0,
        "127.0.0.1",
    )
    assert 0 < env.master_port < 65536


def test_impossible_layouts_are_refused():
    with pytest.raises(UserError, match="TP\\*PP = 2\\*2 = 4"):
        validate_layout(6, ParallelLayout(2, 2))
    with pytest.raises(UserError, match=">= 1"):
        validate_layout(1, ParallelLayout(0, 1))
    validate_layout(8, ParallelLayout(2, 2))


def test_init_single_process_sets_megatron_state():
    from megatron.core import parallel_state

    parallel = init_distributed(ParallelLayout(1, 1), seed=7)
    assert parallel.launch.launcher == "single" and torch.distributed.get_world_size() == 1
    assert torch.distributed.get_backend() == "gloo"
    assert parallel_state.get_tensor_model_parallel_world_size() == 1 == parallel.tp
    assert parallel_state.get_data_parallel_world_size() == 1 == parallel.dp
    assert parallel.first_stage and parallel.last_stage and parallel.main


def _slurm_rank(rank, job_id):
    from megatron.core import parallel_state

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var)  # only Slurm's variables remain, as under srun
    os.environ.update(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS="2",
        SLURM_LOCALID=str(rank),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST="localhost",
    )
    parallel = init_distributed(ParallelLayout(2, 1))
    assert parallel.tp_rank == parallel_state.get_tensor_model_parallel_rank()
    assert parallel.groups.tp.size() == 2 and parallel.dp == parallel.pp == 1
    return (
        parallel.launch.launcher,
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        parallel.tp_rank,
        parallel.launch.master_addr,
        parallel.launch.master_port,
    )


@pytest.mark.multiproc
def test_two_ranks_from_slurm_variables():
    import socket

    from distributed_helpers import run_ranks

    for job_id in range(54321, 54321 + 200):  # find a job id whose derived port is free here
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_master_port(str(job_id))))
                break
            except OSError:
                continue
    results = run_ranks(2, _slurm_rank, job_id)
    port = slurm_master_port(str(job_id))
    assert results == [("slurm", 0, 2, 0, "localhost", port), ("slurm", 1, 2, 1, "localhost", port)]


def _where_a_rank_runs(rank):
    return os.getcwd(), os.environ.get("SOFTGRPO_TEST_PROBE"), os.environ["RANK"]


@pytest.mark.multiproc
def test_ranks_run_in_the_callers_directory_and_environment(tmp_path, monkeypatch):
    """run_ranks forks from a server started earlier: a rank must still see what a spawned one
    would, the caller's directory and variables as they are at the call."""
    from distributed_helpers import run_ranks

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOFTGRPO_TEST_PROBE", "set")
    assert run_ranks(2, _where_a_rank_runs) == [(str(tmp_path), "set", r) for r in "01"]


def _collectives(rank, layout):
    from megatron_softgrpo.distributed import (
        any_rank,
        broadcast_from_last_stage,
        gather_data_parallel,
        gather_to_main,
        max_data_parallel,
        share_from_main,
        sum_data_parallel,
    )

    parallel = init_distributed(ParallelLayout(*layout))
    mine = torch.tensor([[rank, 10 + rank]])
    flags = torch.tensor([rank == 1, True])
    staged = torch.tensor([100 + rank, parallel.last_stage])  # the last stage's values win
    broadcast_from_last_stage(parallel, staged)
    return (
        (parallel.dp, parallel.dp_rank, parallel.pp, parallel.first_stage, parallel.last_stage),
        gather_data_parallel(parallel, mine).tolist(),
        gather_data_parallel(parallel, flags).tolist(),
        sum_data_parallel(parallel, mine.clone()).tolist(),
        max_data_parallel(parallel, 3 + rank, "cpu"),
        staged.tolist(),
        share_from_main(parallel, {"rank": rank}),
        gather_to_main(parallel, [rank, rank]),
        any_rank(parallel, rank == 1),
        any_rank(parallel, False),
    )


@pytest.mark.multiproc
def test_collectives_take_the_parallel_state_they_run_on():
    from distributed_helpers import run_ranks

    dp0, dp1 = run_ranks(2, _collectives, (1, 1))  # two data-parallel ranks
    assert dp0[0] == (2, 0, 1, True, True) and dp1[0] == (2, 1, 1, True, True)
    for got in (dp0, dp1):
        assert got[1] == [[0, 10], [1, 11]] and got[2] == [False, True, True, True]
        assert got[3] == [[1, 21]] and got[4] == 4 and got[5] == [100 + got[0][1], 1]
        assert got[6] == {"rank": 0} and got[8] is True and got[9] is False
    assert dp0[7] == [0, 0, 1, 1] and dp1[7] == []
    pp0, pp1 = run_ranks(2, _collectives, (1, 2))  # two pipeline stages, one replica
    assert pp0[0] == (1, 0, 2, True, False) and pp1[0] == (1, 0, 2, False, True)
    for rank, got in enumerate((pp0, pp1)):
        assert got[1] == [[rank, 10 + rank]]  # DP=1: a rank's own rows
        assert got[5] == [101, 1]  # the last stage's values on both stages


def test_generation_ranks_are_the_last_node_of_a_two_node_slurm_job():
    """The async 7B recipe's split (8 generation ranks of 16): Slurm's block distribution puts
    tasks 8-15 on the second node, and those are the generation ranks, numbered 0-7 there."""
    from megatron_softgrpo.distributed import GenerationLayout, role_of

    split = GenerationLayout(ranks=8, tensor_parallel=4)
    roles = []
    for task in range(16):
        env = detect_launch_env(
            {
                "SLURM_PROCID": str(task),
                "SLURM_NTASKS": "16",
                "SLURM_LOCALID": str(task % 8),
                "SLURM_JOB_NODELIST": "gpu[07-08]",
                "SLURM_JOB_ID": "7",
            }
        )
        roles.append(role_of(env.rank, env.world_size, split))
    assert roles[:8] == [("train", t, 8) for t in range(8)]
    assert roles[8:] == [("generation", t, 8) for t in range(8)]
    assert role_of(3, 4, None) == ("train", 3, 4)  # colocated: one role
