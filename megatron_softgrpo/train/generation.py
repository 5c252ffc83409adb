"""Where the trainer's rollouts are decoded: on the training model (`Colocated`), or by dedicated
generation ranks that hold a copy of their own (`Dedicated` on the training ranks,
`GenerationServer` on the generation ranks; policy.generation.colocated.enabled: false).

The trainer hands either one every training data-parallel rank's block of prompts and gets its
own block's rows back; it never knows which one decodes them. Both decode with the one rollout
engine (`rollout/engine.py`). A request is `submit`ted and its rows `collect`ed in order, so
dedicated ranks can decode the next step's prompts while the trainer trains (grpo.async_grpo);
`generate` is one request decoded now, after every earlier one (validation, extra rounds).

Before a request, the generation ranks are refit (`train/refit.py`) when the policy changed since
their last weights, the version being the trainer's optimizer-step count. Neither side waits for
the other's work to send: a generation rank's reader thread takes every message as it comes (a
refit's weights into a buffer of its shards, loaded when the requests before it are decoded), and
the training main rank's receiver thread takes every result as it comes, so up to
grpo.async_grpo.max_trajectory_age_steps requests can queue while the trainer trains.

Block i is decoded with training data-parallel rank i's noise stream: the first request carries
each rank's state, the generation ranks continue the streams from there, and every result brings
the states back, so the training ranks hold the latest ones (`ahead_state` before a checkpoint)
and, with nothing decoded ahead and no more generation replicas than blocks, a run writes the
colocated run's metrics. More replicas decode each block in parts (`replica_parts`), each part on
a stream seeded from the block's.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque

import torch

from megatron_softgrpo.distributed import ParallelState, gather_to_main, share_from_main
from megatron_softgrpo.models.hf_mapping import (
    full_to_shards,
    load_shards,
    named_model_tensors,
    tp_gather,
)
from megatron_softgrpo.rollout.engine import RolloutEngine
from megatron_softgrpo.soft import noise_state, seed_noise_rng, set_noise_state, split_noise
from megatron_softgrpo.train.metrics_log import ProgressLine
from megatron_softgrpo.train.refit import receive_weights, send_weights

Blocks = list[list[list[int]]]  # per training data-parallel rank: its prompts' token ids
RESULTS_SENDER, RESULTS_RECEIVER = 0, 1  # the generation and training main ranks, on `results`


class Colocated:
    """Rollouts on the training model itself, decoded when collected."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self._requests: deque = deque()

    def submit(self, blocks: Blocks, num_generations: int) -> None:
        self._requests.append((blocks, num_generations))

    def collect(self):
        """The oldest request's rows of this data-parallel rank (None for an empty block); every
        training rank calls it."""
        return self.generate(*self._requests.popleft())

    def generate(self, blocks: Blocks, num_generations: int, progress: ProgressLine | None = None):
        mine = blocks[self.engine.parallel.dp_rank]
        if not mine:
            return None
        batch = self.engine.generate(mine, num_generations, progress)
        self.engine.release()  # the update needs the memory: graphs are captured again next time
        return batch

    def ahead_state(self) -> list:
        """What restores the requests not yet collected (decoded when collected)."""
        return list(self._requests)

    def restore(self, state: list) -> None:
        self._requests = deque(state)

    def metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class Dedicated:
    """The training ranks' side of dedicated generation: requests, refits and their metrics."""

    def __init__(self, worker, parallel: ParallelState):
        self.worker, self.parallel, self.bridges = worker, parallel, parallel.bridges
        self.version: int | None = None  # of the generation ranks' weights (None: as loaded)
        self.ready: deque = deque()  # main rank: results received ahead of their collection
        self.in_flight = 0  # main rank: requests submitted and not yet received
        self._streams_sent = False
        self._states: dict | None = None  # main rank: each block's latest noise state
        self._refit_s = self._busy_s = 0.0
        self._refit_bytes = 0
        self._clock = time.perf_counter()
        if parallel.main:
            self._expected: queue.SimpleQueue = queue.SimpleQueue()  # one True per request
            self._arrived: queue.SimpleQueue = queue.SimpleQueue()  # results, or the error
            self._thread = threading.Thread(target=self._receiver, name="results", daemon=True)
            self._thread.start()

    def submit(self, blocks: Blocks, num_generations: int, report: str | None = None) -> None:
        """Send a request (after a refit if the policy changed); the generation ranks decode
        requests in order. `report`: the generation ranks' first prints the progress under this
        name."""
        self._refit()
        parallel = self.parallel
        # the last pipeline stage draws the noise: its state is the stream to continue
        mine = [(parallel.dp_rank, noise_state())] * parallel.last_stage
        states = None if self._streams_sent else gather_to_main(parallel, mine)
        self._streams_sent = True
        if parallel.main:
            request = (num_generations, blocks, None if states is None else dict(states), report)
            self.bridges.control.broadcast_object(("generate", *request), 0)
            self.in_flight += 1
            self._expected.put(True)

    def collect(self):
        """The oldest request's rows of this data-parallel rank (None for an empty block)."""
        results = None
        if self.parallel.main:
            results = self.ready.popleft() if self.ready else self._receive()
        return self._share(results)

    def generate(self, blocks: Blocks, num_generations: int, progress: ProgressLine | None = None):
        """One request decoded after every earlier one; with a `progress`, the generation ranks'
        first prints its own progress line, under the progress line's name."""
        report = None if progress is None else progress.name
        self.submit(blocks, num_generations, report)
        self._receive_in_flight()  # the earlier requests' results wait in `ready`
        return self._share(self.ready.pop() if self.parallel.main else None)

    def ahead_state(self) -> list | None:
        """What restores the requests not yet collected: their results (main rank). Receives
        every request in flight first, and gives each training rank its stream's latest noise
        state, so the checkpoint holds it. Every training rank calls it."""
        self._receive_in_flight()
        self._share(None)
        return list(self.ready) if self.parallel.main else None

    def restore(self, state: list | None) -> None:
        if self.parallel.main:
            self.ready = deque(state)

    def _receive_in_flight(self) -> None:
        while self.parallel.main and self.in_flight:
            self.ready.append(self._receive())

    def _receiver(self) -> None:
        """Main rank's thread: each request's result received as soon as it is sent, so the
        generation ranks never wait for the trainer to collect it."""
        while self._expected.get():
            try:
                self._arrived.put(self.bridges.results.recv_object(RESULTS_SENDER))
            except BaseException as e:  # raised where the result is collected
                self._arrived.put(e)
                return

    def _receive(self) -> list:
        arrived = self._arrived.get()
        if isinstance(arrived, BaseException):
            self._thread.join()  # its last act (see close)
            raise arrived
        results, states, busy_s = arrived
        self.in_flight -= 1
        self._states = {**(self._states or {}), **states}
        self._busy_s += busy_s
        return results

    def _share(self, results):
        """The main rank's results and latest noise states on every training rank; this rank's block."""
        parallel = self.parallel
        results, states = share_from_main(parallel, (results, self._states))
        if parallel.last_stage and states is not None and parallel.dp_rank in states:
            set_noise_state(states[parallel.dp_rank])
        if results is None:
            return None
        batch = results[parallel.dp_rank]
        return None if batch is None else batch.to(self.worker.device)

    def _refit(self) -> None:
        """Send the policy's weights when they changed since the generation ranks' last ones."""
        version, parallel, bridges = self.worker.optimizer_steps, self.parallel, self.bridges
        if version == self.version:
            return
        start = time.perf_counter()
        if parallel.main:
            bridges.control.broadcast_object(("refit", version), 0)
        model, tp = self.worker.model, parallel.groups.tp
        full = ((n, tp_gather(p.detach(), p, n, tp)) for n, _, p in named_model_tensors(model))
        if bridges.refit is None:  # not a stage's first rank: it only helps gather
            for _ in full:
                pass
        else:  # stage by stage; the other stages' first ranks pass over what they receive
            for stage in range(bridges.stages):
                if stage == parallel.pp_rank:
                    self._refit_bytes += send_weights(full, bridges.refit, src=stage).bytes
                else:
                    for _ in receive_weights(bridges.refit, src=stage):
                        pass
        self._refit_s += time.perf_counter() - start
        self.version = version

    def metrics(self) -> dict:
        """Since the last call: the refits (`time/refit`, `refit/bytes`: the main rank's stage),
        and the fraction of the time the generation ranks were not decoding or loading weights."""
        now = time.perf_counter()
        out = {
            "time/refit": self._refit_s,
            "refit/bytes": self._refit_bytes,
            "async/generation_idle_fraction": max(0.0, 1 - self._busy_s / (now - self._clock)),
        }
        self._refit_s = self._busy_s = 0.0
        self._refit_bytes, self._clock = 0, now
        return out

    def close(self) -> None:
        """Let the generation ranks exit (every training rank calls it; the main one sends)."""
        if self.parallel.main:
            self._receive_in_flight()  # a stop is read after every request
            self._expected.put(False)
            self._thread.join()  # a thread still ending as the process exits aborts it (SIGABRT)
            self.bridges.control.broadcast_object(("stop",), 0)


def replica_parts(blocks: Blocks, replicas: int, replica: int):
    """(block i, part j, parts k, its prompts) that generation replica `replica` of `replicas`
    decodes: with at most as many replicas as blocks, the whole blocks i = replica mod
    `replicas`; with more (a multiple: `check`), each non-empty block cut into k = replicas /
    blocks parts of its prompts, in order (a part may be empty), part j on replica i k + j."""
    parts = max(1, replicas // len(blocks))
    for i, prompts in enumerate(blocks):
        for j in range(parts):
            if prompts and (i * parts + j) % replicas == replica:
                n = len(prompts)
                yield i, j, parts, prompts[j * n // parts : (j + 1) * n // parts]


class GenerationServer:
    """A generation rank's loop: refits and requests from the trainer, in order, until stop. A
    reader thread takes each message as it is sent, receiving a refit's weights into a buffer of
    this rank's shards (the model is only read meanwhile); the main thread loads them and
    decodes, in order."""

    def __init__(self, engine: RolloutEngine, parallel: ParallelState):
        self.engine, self.parallel, self.bridges = engine, parallel, parallel.bridges
        self.states: dict = {}  # block -> its noise stream's state
        self.busy_s = 0.0  # decoding and loading weights since the last result

    def run(self) -> int:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        reader = threading.Thread(target=self._reader, args=(inbox,), name="control", daemon=True)
        reader.start()
        while True:
            message = inbox.get()
            if isinstance(message, BaseException) or message[0] == "stop":
                reader.join()  # its last message; a thread still ending at exit aborts the process
            if isinstance(message, BaseException):
                raise message
            start = time.perf_counter()
            if message[0] == "stop":
                return 0
            if message[0] == "refit":
                load_shards(self.engine.model, message[1])
                self.busy_s += time.perf_counter() - start
            else:
                self._generate(*message[1:], start)

    def _reader(self, inbox: queue.SimpleQueue) -> None:
        """The trainer's messages as they come, a refit with its weights as this rank's shards
        (as many wait as the trainer runs ahead: the trajectory-age bound, one at least)."""
        bridges = self.bridges
        # NCCL receives beside the decode's stream (None: on the CPU, no stream)
        device = bridges.refit.device  # explicit: a thread starts on CUDA's device 0
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            while True:
                message = bridges.control.broadcast_object(None, 0)
                if message[0] == "refit":
                    streams = (receive_weights(bridges.refit, src=s) for s in range(bridges.stages))
                    named = itertools.chain.from_iterable(streams)
                    with torch.cuda.stream(side):
                        shards = full_to_shards(self.engine.model, named, "refit")
                    if side is not None:
                        side.synchronize()  # complete before the main thread loads them
                    message = ("refit", shards)
                inbox.put(message)
                if message[0] == "stop":
                    return
        except BaseException as e:  # raised by the main thread, in order
            inbox.put(e)

    def _generate(
        self, num_generations: int, blocks: Blocks, states: dict | None, report, start
    ) -> None:
        """This replica's parts (`replica_parts`); block i continues noise stream i, and a block
        cut into parts decodes each on a stream seeded from block i's (`split_noise`)."""
        parallel, engine = self.parallel, self.engine
        self.states.update(states or {})
        out = []
        for i, j, parts, prompts in replica_parts(blocks, parallel.dp, parallel.dp_rank):
            set_noise_state(self.states[i])
            if parts > 1:
                seeds = split_noise(parts, engine.device)
                self.states[i] = noise_state()
                seed_noise_rng(seeds[j])
            batch = None
            if prompts:
                progress = None
                if report is not None:
                    part = f", part {j + 1}/{parts}" if parts > 1 else ""
                    name = f"{report} (generation ranks, block {i}{part})"
                    steps = engine.settings.max_new_tokens
                    progress = ProgressLine(name, len(prompts), steps, parallel.main)
                batch = engine.generate(prompts, num_generations, progress).to("cpu")
            if parts == 1:
                self.states[i] = noise_state()
            out.append((i, j, batch, self.states[i]))
        gathered = gather_to_main(parallel, out if parallel.replica_lead else [])
        if parallel.main:
            decoded, latest = {}, {}
            for i, _, batch, state in sorted(gathered, key=lambda part: part[:2]):
                latest[i] = state
                if batch is not None:
                    decoded.setdefault(i, []).append(batch)
            results = [
                engine.joined(decoded[i]) if i in decoded else None for i in range(len(blocks))
            ]
            self.busy_s += time.perf_counter() - start
            self.bridges.results.send_object((results, latest, self.busy_s), RESULTS_RECEIVER)
            self.busy_s = 0.0
