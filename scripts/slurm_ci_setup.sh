#!/usr/bin/env bash
# Install what tests/test_slurm.py's local Slurm cluster needs: Debian's slurm-wlm and munge
# packages. Idempotent: installs nothing when the binaries are there. The tests start (and stop)
# the cluster themselves, with a private configuration; this script starts no daemon.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
if have slurmctld && have slurmd && have sbatch && have munged; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge
