#!/usr/bin/env bash
# Install what tests/test_slurm.py's local Slurm cluster needs: Debian's slurm-wlm and munge
# packages. Idempotent: installs nothing when the binaries are there. The tests start (and stop)
# the cluster themselves, with a private configuration; this script starts no daemon.
# Without apt-get and root (or sudo) it installs nothing: the Slurm tests then skip, unless
# SOFTGRPO_REQUIRE_SLURM=1 (CI), which makes this script fail, and those tests too.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
if have slurmctld && have slurmd && have sbatch && have munged; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1 || { [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; }; then
  if [ "${SOFTGRPO_REQUIRE_SLURM:-0}" = 1 ]; then
    echo "slurm_ci_setup.sh: error: SOFTGRPO_REQUIRE_SLURM=1 but slurm-wlm and munge are missing and cannot be installed (needs apt-get and root or sudo)" >&2
    exit 1
  fi
  echo "slurm_ci_setup.sh: no apt-get/root: slurm-wlm and munge not installed; the Slurm tests (tests/test_slurm.py) will be skipped" >&2
  exit 0
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge
