"""The decode backends against each other: the fixed-shape step against Megatron's forward,
compiled against eager, and the engine's records on the fixed-shape backend against those on
Megatron's forward (the reference), at TP=1, TP=2 and PP=2."""

from __future__ import annotations

import pytest
import torch
from builders import (
    EOS,
    PROMPTS,
    VOCAB,
    assert_same_records,
    build,
    build64,
    gumbel,
    new_worker,
    rescoring_recipe,
    response_tokens,
    run,
    settings,
    staggered_eos,
    static_engine,
)
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source
from megatron_softgrpo.rollout import replay
from megatron_softgrpo.rollout.engine import RolloutEngine
from megatron_softgrpo.rollout.megatron_backend import MegatronBackend
from megatron_softgrpo.rollout.static_backend import StaticBackend
from megatron_softgrpo.soft import (
    DiscreteSampler,
    EmbeddingNoise,
    MixtureRecord,
    MultiplexSampler,
    SoftSampler,
    Truncation,
    seed_noise_rng,
)
from megatron_softgrpo.soft.noises import DirichletNoise, GaussianNoise
from megatron_softgrpo.train.generation import Colocated
from model_patches.static_decode import PACKED_MIN_ROWS, StaticDecoder, can_pack, length_bucket


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_hf_model("llama", path, vocab_size=VOCAB)
    return str(path)


def _prompt_batch(b=3, plen=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, plen), generator=g)
    pad = torch.zeros(b, plen, dtype=torch.bool)
    pad[0, :2], pad[2, :4] = True, True  # left padding of different widths
    return tokens, pad


PACKS = can_pack(torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "kind,pack",
    [
        ("qwen2", False),
        ("llama", False),
        pytest.param("qwen2", True, marks=pytest.mark.skipif(not PACKS, reason="not x86 oneDNN")),
    ],
)
def test_static_step_matches_megatron_cached_forward(kind, pack, tiny_dir, llama_dir):
    """Prefill and decode steps over left-padded rows: the logit shard of Megatron's own cached
    forward (MegatronBackend, itself held to full recomputation) to fp32 rounding; also with
    the GEMMs on oneDNN-packed copies of the weights (the default on an x86 CPU in fp32)."""
    model, _, parallel = build(tiny_dir if kind == "qwen2" else llama_dir)
    tokens, pad = _prompt_batch(b=PACKED_MIN_ROWS if pack else 3)
    b, plen = tokens.shape
    runner, static = MegatronBackend(model, parallel), StaticDecoder(model, b, 16, pack=pack)
    assert static.layers[0].fc1.is_mkldnn == static.output.is_mkldnn == pack
    runner.start(b, 16)
    records = MixtureRecord.discrete(tokens, 5)
    with torch.no_grad():
        expected = [runner.prefill(records, pad.sum(1), None)]
        x = static.embed(records.mix_ids, records.mix_weights)
        got = [static.forward(x, torch.arange(plen), pad.sum(1), 8)]
        g = torch.Generator().manual_seed(1)
        for t in range(6):
            step = MixtureRecord.discrete(torch.randint(0, VOCAB, (b,), generator=g), 5)
            step.mix_weights[:, :2] = torch.tensor([0.7, 0.3])  # a soft mixture input
            step.mix_ids[:, 1] = (step.tokens + 11) % VOCAB
            expected.append(runner.step(step, None))
            x = static.embed(step.mix_ids[:, None], step.mix_weights[:, None])
            got.append(static.forward(x, torch.tensor([plen + t]), pad.sum(1), 16))
    for e, s in zip(expected, got, strict=True):
        assert e.shape == s.shape == (b, VOCAB)  # this rank's (here: the whole) logit shard
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5)


def test_compiled_step_equals_eager_one_compile_per_bucket(tiny_dir):
    """torch.compile(fullgraph=True) of the decode step: no graph break (fullgraph raises on
    one), one compile per length bucket and none for later steps in it, eager's logits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _, _ = build(tiny_dir)
    tokens, pad = _prompt_batch()
    b, plen = tokens.shape
    eager, compiled = StaticDecoder(model, b, 80), StaticDecoder(model, b, 80)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(compiled.forward, backend=counter, fullgraph=True, dynamic=False)
    records = MixtureRecord.discrete(tokens, 5)
    with torch.no_grad():
        for dec in (eager, compiled):
            dec.forward(
                dec.embed(records.mix_ids, records.mix_weights), torch.arange(plen), pad.sum(1), 8
            )
        g = torch.Generator().manual_seed(2)
        for t in range(plen, 70):  # crosses from the 64-column bucket into the 80-column one
            nxt = MixtureRecord.discrete(torch.randint(0, VOCAB, (b,), generator=g), 5)
            x = eager.embed(nxt.mix_ids[:, None], nxt.mix_weights[:, None])
            length = length_bucket(t + 1, 80)
            want = eager.forward(x, torch.tensor([t]), pad.sum(1), length)
            got = step(x, torch.tensor([t]), pad.sum(1), length)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 2  # buckets 64 and 80
    for a, c in zip(eager.keys, compiled.keys, strict=True):  # the cache written in place
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the engine, backend against backend
#
# In float64: soft thinking amplifies differences step by step (softmax(g / 0.1) of the logits
# feeds the next input), so the fp32 rounding differences of two summation orders grow into
# different trajectories within ~10 steps on these random models. In float64 both backends give
# the same fp32 logits, so every record can be compared tightly on any CPU.


def _both(model, shard, parallel, tokenizer, prompts=PROMPTS, g=2, seed=7, **overrides):
    s = settings(**overrides)
    seed_noise_rng(seed)
    reference = RolloutEngine(model, tokenizer, shard, s, parallel).generate(prompts, g)
    seed_noise_rng(seed)
    static = static_engine(model, tokenizer, shard, s, parallel).generate(prompts, g)
    return reference, static


def test_greedy_decoding_is_token_for_token_the_reference(tiny_dir, tokenizer):
    model, shard, parallel = build64(tiny_dir)
    greedy = DiscreteSampler(Truncation.greedy(), 5)
    ref, static = _both(
        model, shard, parallel, tokenizer, thinking_sampler=None, answer_sampler=greedy
    )
    assert_same_records(ref, static)
    assert not ref.records.is_soft.any()


@pytest.mark.parametrize(
    "noise", ["gumbel", "gaussian", "dirichlet", "embedding_noise", "multiplex"]
)
def test_seeded_soft_decoding_gives_the_reference_records(tiny_dir, tokenizer, noise):
    """Rows finishing at three different steps (EOS ids found on the reference), a forced marker
    after a thinking budget, and a stop string: every record as the reference engine's.
    Dirichlet draws at the step, for its live rows only: its token steps are never replayed."""
    model, shard, parallel = build64(tiny_dir)
    sampler = {
        "gumbel": gumbel(),
        "gaussian": SoftSampler(Truncation(1.0, 5, 0.95), 5, GaussianNoise(0.05)),
        "dirichlet": SoftSampler(Truncation(1.0, 5, 0.95), 5, DirichletNoise()),
        "embedding_noise": SoftSampler(Truncation(1.0, 5, 0.95), 5, EmbeddingNoise(0.01, 64)),
        "multiplex": MultiplexSampler(Truncation(1.0, None, 0.95), 5),
    }[noise]
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    kwargs = dict(thinking_sampler=sampler, max_thinking_tokens=4, max_new_tokens=14)
    eos = staggered_eos(model, shard, parallel, tokenizer, marker, **kwargs)
    ref, static = _both(model, shard, parallel, tokenizer, eos_ids=eos, **kwargs)
    assert_same_records(ref, static)
    assert len(set(ref.response_lengths.tolist())) >= 3  # rows ended at different steps
    assert "eos" in ref.finish_reasons and ref.records.is_soft.any()
    assert (ref.think_lengths < ref.response_lengths).any()  # some row was forced into answering


def test_entropy_cold_stop_and_stop_strings_as_the_reference(tiny_dir, tokenizer):
    model, shard, parallel = build64(tiny_dir)
    first = _both(model, shard, parallel, tokenizer, cold_stop_entropy=50.0, cold_stop_steps=2)[0]
    assert (first.think_lengths < first.response_lengths).all()  # cold stop forced every row
    # a stop string the reference's first response produces in its answer
    stop = first.answer_texts[0].strip()[:3]
    ref, static = _both(
        model,
        shard,
        parallel,
        tokenizer,
        cold_stop_entropy=50.0,
        cold_stop_steps=2,
        stop_strings=(stop,),
    )
    assert_same_records(ref, static)
    assert "stop" in ref.finish_reasons


@pytest.mark.parametrize("backend", ["static", "megatron"])
def test_a_training_rank_frees_the_cache_after_each_rollout(tiny_dir, tokenizer, backend):
    """Colocated rollouts release the engine's cache and step tensors after decoding (the
    update needs the memory); the next pass allocates them again and decodes the same records.
    Without a release (a dedicated generation rank) they stay for the next pass."""
    model, shard, parallel = build64(tiny_dir)
    s = settings(thinking_sampler=gumbel())
    if backend == "static":
        engine = static_engine(model, tokenizer, shard, s, parallel)
        held = lambda: engine.backend.decoder  # noqa: E731
    else:
        engine = RolloutEngine(model, tokenizer, shard, s, parallel)
        held = lambda: engine.backend.cache  # noqa: E731
    seed_noise_rng(7)
    first = Colocated(engine).generate([PROMPTS], 2)
    assert held() is None and engine._live is None
    seed_noise_rng(7)
    assert_same_records(first, engine.generate(PROMPTS, 2))
    assert held() is not None and engine._live is not None


def test_odd_batches_reuse_the_decoder_bucket(tiny_dir, tokenizer):
    """3 prompts x 2 rows pad to an 8-row bucket: the padding rows leave no trace, and a second
    call of another batch size in the same bucket reuses the decoder (and its compiled code)."""
    model, shard, parallel = build64(tiny_dir)
    engine = static_engine(model, tokenizer, shard, settings(), parallel)
    seed_noise_rng(3)
    engine.generate(PROMPTS, 2)
    decoder = engine.backend.decoder
    seed_noise_rng(3)
    static = engine.generate(PROMPTS[:2], 3)
    assert engine.backend.decoder is decoder
    seed_noise_rng(3)
    ref = RolloutEngine(model, tokenizer, shard, settings(), parallel).generate(PROMPTS[:2], 3)
    assert_same_records(ref, static)


# a bounded support, as the answer sampler's (builders.settings)
THINKING = {"gumbel": None, "multiplex": MultiplexSampler(Truncation(1.0, 20, 0.9), 5)}


def _tp_settings(thinking: str):
    extra = {} if THINKING[thinking] is None else {"thinking_sampler": THINKING[thinking]}
    return settings(max_thinking_tokens=5, **extra)


def _rank_static(rank, tiny_dir, tp, pp, tokenizer_dir, thinking, compile):
    model, shard, parallel = build64(tiny_dir, tp, pp)
    tokenizer = load_tokenizer(resolve_model_source(tokenizer_dir))
    replay.COMPILE_BACKEND = "eager"  # traced whole (fullgraph), run as traced
    seed_noise_rng(7)
    s = _tp_settings(thinking)
    return static_engine(model, tokenizer, shard, s, parallel, compile=compile).generate(PROMPTS, 2)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "tp,pp,thinking,compile",
    [
        (2, 1, "gumbel", False),
        (1, 2, "gumbel", False),
        (2, 1, "multiplex", True),
        (1, 2, "multiplex", True),
    ],
    ids=["tp2", "pp2", "tp2-multiplex-replayed", "pp2-multiplex-replayed"],
)
def test_static_engine_at_tp2_and_pp2_gives_the_tp1_reference(
    tiny_dir, tokenizer, smollm2_hf_dir, tp, pp, thinking, compile
):
    """Replayed: at TP=2 the whole token step (its all-reduces and gathers inside), at PP=2 each
    stage's layers between the hand-offs, traced with fullgraph=True."""
    model, shard, parallel = build64(tiny_dir)
    seed_noise_rng(7)
    ref = RolloutEngine(model, tokenizer, shard, _tp_settings(thinking), parallel).generate(
        PROMPTS, 2
    )
    args = (tiny_dir, tp, pp, str(smollm2_hf_dir), thinking, compile)
    runs = run_ranks(tp * pp, _rank_static, *args)
    for result in runs:
        # the TP sampler reduces its fp32 candidates across ranks: weights within a few ulps
        assert_same_records(ref, result, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["softgrpo", "gaussian", "grpo", "multiplex"])
def test_trainer_rescores_the_static_rollout(tiny_dir, tokenizer, algorithm):
    """The trainer's full-sequence log-probs reproduce the static rollout's densities to 1e-5
    (Multiplex Thinking's per slot)."""

    from megatron_softgrpo.batch import Batch
    from megatron_softgrpo.rollout.settings import RolloutSettings

    cfg = rescoring_recipe(tiny_dir, algorithm)
    worker = new_worker(cfg)
    s = RolloutSettings.from_recipe(
        cfg, tokenizer, worker.source.arch.hidden_size, max_new_tokens=10, eos_ids=frozenset({EOS})
    )
    seed_noise_rng(7)
    engine = static_engine(worker.model, tokenizer, worker.vocab, s, worker.parallel)
    result = engine.generate(PROMPTS[:2], 2)
    logp = worker.compute_logprobs(Batch(result.records, result.loss_mask))
    mask, scorer = result.loss_mask, worker.scorer
    assert bool((mask & result.records.is_soft).any()) == (algorithm != "grpo")
    units = scorer.scored_units(mask, result.records)
    error = logp - scorer.rollout_units(result.rollout_logp, result.records)
    assert error[units].abs().max() <= 1e-5 and (logp[~units] == 0).all()


def test_a_marker_the_model_writes_switches_phase_as_in_the_reference(tiny_dir, tokenizer):
    """think_end set to two tokens the first response writes while thinking: the sampled step
    that completes it becomes a discrete, scored step in both engines, and the answer follows."""
    model, shard, parallel = build64(tiny_dir)
    first = _both(model, shard, parallel, tokenizer, max_new_tokens=10)[0]
    start = int(first.prompt_lengths[0])
    marker = tokenizer.decode(first.records.tokens[0, start + 2 : start + 4])
    ref, static = _both(model, shard, parallel, tokenizer, max_new_tokens=10, think_end=marker)
    assert_same_records(ref, static)
    assert ref.think_lengths[0] <= 4 and ref.thinking_texts[0].endswith(marker)


def test_shrinking_to_a_smaller_bucket_keeps_every_record(tiny_dir, tokenizer):
    """18 rows (a 24-row bucket), most ending by step 4: the engine moves to an 8-row bucket
    (rows moved to the front of the same cache) and the records are the reference's, as
    without shrinking; with 1-row buckets (an eager step on the CPU) each step decodes exactly
    the rows still decoding, as on Megatron's forward."""
    model, shard, parallel = build64(tiny_dir)
    kwargs = dict(max_new_tokens=10)
    first = _both(model, shard, parallel, tokenizer, g=6, **kwargs)[0]
    marker = set(tokenizer("</think>", add_special_tokens=False)["input_ids"])
    starts = first.prompt_lengths.tolist()
    eos = {int(first.records.tokens[i, starts[i] + 3]) for i in range(14)} - marker
    s = settings(eos_ids=frozenset(eos), **kwargs)
    seed_noise_rng(7)
    reports = {"ref": []}
    ref = RolloutEngine(model, tokenizer, shard, s, parallel).generate(
        PROMPTS, 6, lambda *r: reports["ref"].append(r)
    )
    decoding = [int((ref.response_lengths > t).sum()) for t in range(1, 10)]
    for shrink, bucket in ((True, 8), (False, 8), (True, 1)):
        engine = static_engine(model, tokenizer, shard, s, parallel, bucket, shrink=shrink)
        rows, decode = [], engine.backend.decode
        engine.backend.decode = lambda records, offset: (
            rows.append(len(records.tokens)),
            decode(records, offset),
        )[1]
        seed_noise_rng(7)
        progress = reports.setdefault((shrink, bucket), []).append
        assert_same_records(ref, engine.generate(PROMPTS, 6, lambda *r: progress(r)))
        assert engine.backend.decoder.batch == (24 if bucket == 8 else 18)  # one cache
        if bucket == 1:
            assert rows == decoding
        else:
            assert rows[-1] == 8 < rows[0] if shrink else set(rows) == {24}
    assert (ref.response_lengths <= 4).sum() >= 10 and ref.response_lengths.max() == 10
    # progress: (rows finished, steps done) after every step, the same from both engines
    ended = [int(((ref.response_lengths <= t) & ~ref.truncated).sum()) for t in range(1, 10)]
    ended.append(18)  # the last step ends every row, at the length limit
    assert all(r == list(zip(ended, range(1, 11))) for r in reports.values())


@pytest.mark.parametrize("kind", ["megatron", "static"])
def test_each_prompt_is_prefilled_once_for_its_group(tiny_dir, tokenizer, kind):
    """G rows of one prompt share its prefill (one row per prompt, then cache copies): the
    records are those of prefilling every row on its own (the prompts repeated, G = 1)."""
    model, shard, parallel = build64(tiny_dir)
    make = {"megatron": MegatronBackend, "static": lambda m, p: StaticBackend(m, p, row_bucket=4)}
    prefilled = []

    def backend(model, parallel):
        b = make[kind](model, parallel)
        prefill = b.prefill

        def counted(records, *args):
            prefilled.append(len(records.tokens))
            return prefill(records, *args)

        b.prefill = counted
        return b

    shared = run(model, shard, parallel, tokenizer, g=3, backend=backend)
    rows = [p for p in PROMPTS for _ in range(3)]
    alone = run(model, shard, parallel, tokenizer, rows, 1, backend=backend)
    assert prefilled == [len(PROMPTS), 3 * len(PROMPTS)]
    assert_same_records(alone, shared)
    assert len(set(map(tuple, response_tokens(shared)))) > len(PROMPTS)  # the rows differ


@pytest.mark.skipif(not PACKS, reason="packed GEMM weights: x86 oneDNN only")
def test_packed_weights_follow_an_update_at_the_next_pass(tiny_dir, tokenizer):
    """In fp32 on an x86 CPU the fixed-shape step multiplies by packed copies of the weights:
    after the weights change in place (as the optimizer changes them), the next pass decodes
    with the new ones, as a new engine on them does."""
    model, shard, parallel = build(tiny_dir)
    engine = static_engine(model, tokenizer, shard, settings(), parallel)
    seed_noise_rng(7)
    before = engine.generate(PROMPTS, 2)
    assert engine.backend.decoder.layers[0].qkv.is_mkldnn
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    seed_noise_rng(7)
    after = engine.generate(PROMPTS, 2)
    seed_noise_rng(7)
    fresh = static_engine(model, tokenizer, shard, settings(), parallel).generate(PROMPTS, 2)
    assert_same_records(fresh, after)
    assert response_tokens(after) != response_tokens(before)


def test_load_weights_copies_in_place_and_names_an_unknown_parameter(tiny_dir, tokenizer):
    """New weights reach the tensors every backend decodes on, and a name the model lacks is
    refused before anything is copied."""
    model, shard, parallel = build64(tiny_dir)
    engine = static_engine(model, tokenizer, shard, settings(), parallel)
    name, param = next(iter(model.named_parameters()))
    storage = param.data_ptr()
    new = param.detach() + 0.25
    engine.load_weights({name: new})
    assert param.data_ptr() == storage and torch.equal(param.detach(), new)
    before = param.detach().clone()
    with pytest.raises(KeyError, match="no parameter named 'nope'"):
        engine.load_weights({name: new + 1, "nope": new})
    assert torch.equal(param.detach(), before)
