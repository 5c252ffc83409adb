"""benchmarks/gpu/run.sh on the CPU, with stand-ins for the device's python3 and nvidia-smi that
only record their calls: every step's command line parses against its script, results land under
$OUT within the device's file limit, the budget and a selection choose the steps, and a checkout
without prepare.sh's folders stops before any step. A GPU session then spends no minute on a typo."""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
from builders import ROOT

RUN_SH = ROOT / "benchmarks" / "gpu" / "run.sh"
STEPS = [  # run.sh's order: the graph check, then the graphed engine's throughput
    "graphs", "rollout_static", "check_cuda", "logprob", "update", "rollout_batch64",
    "update_fused_swiglu", "update_losses",
]  # fmt: skip
DEVICE_FILES = 8  # what a device call brings back from $OUT


def run_sh(tmp_path, *steps, budget=None, prepared=True):
    """run.sh in a copy of its folder layout; returns (exit code, log, each python3 call's argv)."""
    tree, out, calls = tmp_path / "tree", tmp_path / "out", tmp_path / "calls.jsonl"
    (tree / "benchmarks" / "gpu").mkdir(parents=True, exist_ok=True)
    shutil.copy(RUN_SH, tree / "benchmarks" / "gpu" / "run.sh")
    if prepared:
        (tree / ".whl").mkdir(exist_ok=True)
        (tree / ".whl" / "megatron_core-0.16.1-py3-none-any.whl").touch()
        (tree / ".gpu_assets" / "tokenizer").mkdir(parents=True, exist_ok=True)
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    record = f'import json, sys; print(json.dumps(sys.argv[1:]), file=open("{calls}", "a"))'
    (bin_ / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} -c '{record}' \"$@\"\n")
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\n")
    for shim in bin_.iterdir():
        shim.chmod(0o755)
    path = f"{bin_}:{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, OUT=str(out), RUN_SITE=str(tmp_path / "site"))
    env.pop("RUN_BUDGET_S", None)  # None: run.sh's default
    if budget is not None:
        env["RUN_BUDGET_S"] = str(budget)
    done = subprocess.run(["bash", str(tree / "benchmarks/gpu/run.sh"), *steps], env=env)
    argvs = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    log = (out / "log.txt").read_text()
    return done.returncode, log, [a for a in argvs if a and a[0].endswith(".py")]


class Parsed(Exception):
    pass


def parse_only(argv, monkeypatch) -> argparse.Namespace:
    """The script's own argument parser on `argv`, stopped right after parsing."""
    parse = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except Parsed as parsed:
        return parsed.args[0]
    except SystemExit as e:  # argparse's error: an unknown flag, a bad value
        pytest.fail(f"{' '.join(argv)}: the script rejects its arguments (exit {e.code})")
    pytest.fail(f"{argv[0]}: never parsed its arguments")


def test_every_step_runs_in_order_and_its_arguments_parse(tmp_path, monkeypatch):
    code, log, calls = run_sh(tmp_path)
    assert code == 0, log
    ran = re.findall(r"^== (\w+): exit 0 ", log, flags=re.MULTILINE)
    assert ran == STEPS  # nothing skipped under the default budget
    assert "not run" not in log and len(calls) == len(STEPS)
    outputs = set()
    for argv in calls:
        args = parse_only(argv, monkeypatch)
        if getattr(args, "tokenizer", None) is not None:
            assert args.tokenizer == ".gpu_assets/tokenizer"  # what prepare.sh writes
        if getattr(args, "json", None):
            assert os.path.dirname(args.json) == str(tmp_path / "out")  # comes back from $OUT
            outputs.add(args.json)
    assert 1 + len(outputs) <= DEVICE_FILES  # log.txt and one file a step


def test_the_budget_skips_a_step_that_would_overrun_and_names_it_for_the_next_call(tmp_path):
    code, log, calls = run_sh(tmp_path, budget=200)  # rollout_static's limit is 300 s
    assert code == 0
    assert "== rollout_static: skipped" in log
    assert "next call: bash benchmarks/gpu/run.sh rollout_static\n" in log
    assert len(calls) == len(STEPS) - 1 and not any("--static-gpu" in a for a in calls)


def test_named_steps_run_alone_in_the_scripts_order(tmp_path):
    code, log, calls = run_sh(tmp_path, "update_losses", "graphs")
    assert code == 0
    assert [a[0] for a in calls] == ["benchmarks/gpu/check_graphs.py", "benchmarks/update.py"]
    assert "--loss-variants" in calls[1]


def test_an_unprepared_checkout_stops_before_any_step_and_says_what_to_run(tmp_path):
    code, log, calls = run_sh(tmp_path, prepared=False)
    assert code == 2 and calls == []
    assert "benchmarks/gpu/prepare.sh" in log
