"""Save-and-exit on SIGTERM / SIGUSR1 (Slurm preemption and `scancel --signal`).

The handler only raises a flag; the training loop checks it at a safe point (between RL
steps), where all ranks agree on it, save a checkpoint, and exit with REQUEUE_EXIT_CODE so
the job script can requeue and the next run resumes from that checkpoint. `softgrpo train`
installs the watcher before anything else (a signal while the model loads is checked before
the first step: exit REQUEUE_EXIT_CODE with nothing new to save) and restores the previous
handlers however the run ends.
"""

from __future__ import annotations

import signal

from megatron_softgrpo.distributed import ParallelState, any_rank

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class PreemptionWatcher:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
        print(
            f"[softgrpo] received signal {signal.Signals(signum).name}: checkpointing at the next safe point",
            flush=True,
        )

    def should_stop(self, parallel: ParallelState) -> bool:
        """True on every rank as soon as any rank got a signal (a collective: call it on all ranks)."""
        return any_rank(parallel, self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
