"""Token steps replayed: a function of no arguments that reads and writes only tensors that
outlive it (in place), run once per call, the same kernels on the same tensors for one key.

- "graph": captured as one CUDA graph per key, all graphs in one memory pool. The first call
  of a key runs the step eagerly (the step itself, and the warm-up a capture needs: lazy
  initialisation, allocator growth), then captures it for the next call: recording launches
  nothing, so no step runs twice. The capture error mode is thread-local: NCCL's watchdog
  thread polls its events during a capture of the TP all-reduces, which the default (global)
  mode would turn into a capture error.
- "compile": `torch.compile(fullgraph=True)` once per key (no host read, as a capture needs).
- None: run as it is.

Every mode builds a key's step once: it reads the same tensors (views fixed at build) each time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

Step = Callable[[], None]
COMPILE_BACKEND = "inductor"  # torch.compile's (the tests trace only: "eager", or a counter)


class Replays:
    def __init__(self, mode: str | None):
        if mode not in (None, "graph", "compile"):
            raise ValueError(f"replay mode must be None, 'graph' or 'compile', got {mode!r}")
        self.mode = mode
        self.steps: dict[Hashable, Step] = {}
        self.pool = None  # the graphs' shared memory pool

    def run(self, key: Hashable, make: Callable[[], Step]) -> None:
        """The step `make()` builds for `key`: built once per key, then run or replayed."""
        step = self.steps.get(key)
        if step is not None:
            step()
        elif self.mode is None:
            self.steps[key] = step = make()
            step()
        elif self.mode == "compile":
            import torch._dynamo

            # one compile per (rows, length bucket): more than dynamo's default 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            self.steps[key] = step = torch.compile(
                make(), backend=COMPILE_BACKEND, fullgraph=True, dynamic=False
            )
            step()
        else:
            step = make()
            step()  # this step, eagerly: also the capture's warm-up
            self.steps[key] = self._capture(step)

    def clear(self) -> None:
        """Forget every capture (the tensors they were made on are gone)."""
        self.steps.clear()

    def _capture(self, fn: Step) -> Step:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph.replay
