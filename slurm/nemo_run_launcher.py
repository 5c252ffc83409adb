#!/usr/bin/env python3
"""`softgrpo train` through NeMo-Run's SlurmExecutor or LocalExecutor; see
megatron_softgrpo/launch/nemo_run_launcher.py.

    python slurm/nemo_run_launcher.py slurm RECIPE [overrides] --nodes 2 --gpus-per-node 8 --account A --partition P
    python slurm/nemo_run_launcher.py local RECIPE [overrides] --tasks-per-node 2
"""

from megatron_softgrpo.launch.nemo_run_launcher import main

if __name__ == "__main__":
    raise SystemExit(main())
