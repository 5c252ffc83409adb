"""Mixture input embeddings on Megatron's vocabulary-parallel table, at TP=1 and TP=2 (with sequence parallelism)."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.models.forward import CAUSAL, position_ids
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import resolve_model_source
from model_patches.mixture_embedding import mixture_embedding

B, S, K = 2, 12, 4
TOKENS = torch.tensor(
    [
        [5, 17, 999, 3, 42, 7, 7, 100, 256, 1, 0, 998],
        [900, 2, 33, 4, 8, 16, 32, 64, 128, 512, 11, 12],
    ]
)


def mixtures(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (B, S, K), generator=gen)  # real ids on both shards of 1024 / 2
    weights = torch.rand(B, S, K, generator=gen)
    return ids, weights / weights.sum(-1, keepdim=True)


def one_hot(tokens):
    ids = torch.zeros(B, S, K, dtype=torch.long)
    ids[..., 0] = tokens
    weights = torch.zeros(B, S, K)
    weights[..., 0] = 1.0
    return ids, weights


def build(model_dir, tp):
    parallel = init_distributed(ParallelLayout(tp, 1))
    mcfg = MegatronCfg(tensor_model_parallel_size=tp)
    model, _ = load_model(resolve_model_source(str(model_dir)), mcfg, parallel)
    return model.eval()


def run_model(model, decoder_input=None):
    with torch.no_grad():
        return model(TOKENS, position_ids(B, S, "cpu"), CAUSAL, decoder_input=decoder_input)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_hf_model("qwen2", path)
    return path


def test_one_hot_mixture_is_the_ordinary_embedding_and_gives_the_same_logits(model_dir):
    model = build(model_dir, 1)
    words = model.embedding.word_embeddings
    x = mixture_embedding(words, *one_hot(TOKENS))
    with torch.no_grad():
        expected = model.embedding(input_ids=TOKENS, position_ids=position_ids(B, S, "cpu"))
    assert x.shape == (S, B, 64) and x.dtype == expected.dtype
    assert torch.equal(x, expected)
    assert torch.equal(run_model(model, decoder_input=x), run_model(model))


def test_mixture_is_the_weighted_sum_of_rows_and_detached(model_dir):
    model = build(model_dir, 1)
    words = model.embedding.word_embeddings
    ids, weights = mixtures()
    weights.requires_grad_()
    x = mixture_embedding(words, ids, weights)
    table = words.weight.detach().double()
    expected = torch.einsum("bsk,bskh->sbh", weights.detach().double(), table[ids])
    assert (x.double() - expected).abs().max() <= 1e-6
    assert not x.requires_grad and words.weight.requires_grad
    offset = torch.randn(B, S, 64)
    assert torch.allclose(
        mixture_embedding(words, ids, weights, offset=offset), x + offset.transpose(0, 1), atol=1e-6
    )


def _rank(rank, model_dir):
    model = build(model_dir, 2)
    words = model.embedding.word_embeddings
    ids, weights = mixtures()
    offset = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(9))
    mixed = mixture_embedding(words, ids, weights, offset=offset)
    scattered = mixture_embedding(words, ids, weights, offset=offset, sequence_parallel=True)
    x = mixture_embedding(words, *one_hot(TOKENS))
    with torch.no_grad():
        expected = model.embedding(input_ids=TOKENS, position_ids=position_ids(B, S, "cpu"))
    return dict(
        mixed=mixed,
        scattered_is_my_slice=torch.equal(scattered, mixed.chunk(2, dim=0)[rank]),
        one_hot_exact=torch.equal(x, expected),
        same_logits=torch.equal(run_model(model, decoder_input=x), run_model(model)),
    )


@pytest.mark.multiproc
def test_tensor_parallel_2_mixture_equals_tp1(model_dir):
    model = build(model_dir, 1)
    ids, weights = mixtures()
    offset = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(9))
    single = mixture_embedding(model.embedding.word_embeddings, ids, weights, offset=offset)
    from megatron_softgrpo.distributed import destroy_distributed

    destroy_distributed()
    for result in run_ranks(2, _rank, model_dir):
        assert result["one_hot_exact"] and result["same_logits"] and result["scattered_is_my_slice"]
        assert (result["mixed"] - single).abs().max() <= 1e-6
