"""Launchers that wrap `softgrpo train` for cluster tools (the sbatch template lives in slurm/)."""
