"""benchmarks/gpu/check_graphs.py on the CPU (cuda_graphs ignored there): it passes on the engine
as it is, and reports the field and position where the graphs-on records differ."""

from __future__ import annotations

import importlib.util

from builders import ROOT

from megatron_softgrpo.rollout.phases import PhaseMachine
from megatron_softgrpo.rollout.static_backend import StaticBackend

spec = importlib.util.spec_from_file_location(
    "check_graphs", ROOT / "benchmarks" / "gpu" / "check_graphs.py"
)
check_graphs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_graphs)


def test_the_graph_check_passes_with_shrinks_on_the_late_count(tiny_dir, tokenizer):
    emitted = []
    (result,) = check_graphs.run(
        tokenizer, tiny_dir, ["staggered"], ["greedy"], ["float64"], emit=emitted.append
    )
    assert result["ok"] and result["differences"] == [], result
    assert result["compared"] == "reference = graphs_off = graphs_on"
    assert result["rows_end_in_windows"] and result["shrinks_to"] == [24, 16, 8]
    assert result["graphs_captured"] == []  # the CPU ignores cuda_graphs
    assert emitted and emitted[-1][-1] is result  # each result handed out as soon as it exists


def test_the_graph_check_reports_a_token_that_differs(tiny_dir, tokenizer, monkeypatch):
    backend_init, phase_step, graphs = StaticBackend.__init__, PhaseMachine.step, [False]

    def noting_graphs(self, model, parallel, compile=False, cuda_graphs=False, **kwargs):
        graphs[0] = cuda_graphs  # whether this engine would replay graphs (on a GPU)
        backend_init(self, model, parallel, compile, cuda_graphs, **kwargs)

    def wrong_on_replay(self, logits, st, t, tapes, origin):
        out, scored = phase_step(self, logits, st, t, tapes, origin)
        if graphs[0] and t == 1:  # as a stale graph input would: row 3's token
            out.tokens = out.tokens.clone()
            out.tokens[3] += 1
        return out, scored

    monkeypatch.setattr(StaticBackend, "__init__", noting_graphs)
    monkeypatch.setattr(PhaseMachine, "step", wrong_on_replay)
    (result,) = check_graphs.run(tokenizer, tiny_dir, ["within_lag"], ["greedy"], ["float32"])
    assert not result["ok"] and result["compared"] == "graphs_off = graphs_on"
    assert any(
        d.startswith("graphs_on vs graphs_off: records.tokens first differ at [3,")
        for d in result["differences"]
    ), result["differences"]
