import gc
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """Tests run as a single process unless they spawn ranks themselves."""
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    import torch.distributed

    from megatron_softgrpo.distributed import destroy_distributed

    initialized = torch.distributed.is_initialized()
    destroy_distributed()
    if initialized:  # free the test's models now: cyclic garbage holding its gloo groups,
        gc.collect()  # whose threads poll (a few hundred of them between collections)


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """SmolLM2-135M-Instruct dequantised once per machine (cached under $SOFTGRPO_CACHE)."""
    from megatron_softgrpo.models.source import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def tokenizer(smollm2_hf_dir):
    """SmolLM2's tokenizer (49,152 tokens), also the vocabulary of the tiny random models."""
    from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source(str(smollm2_hf_dir)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2 (QKV bias, untied output) on SmolLM2's vocabulary."""
    from tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("qwen2", path, vocab_size=49152)
    return str(path)


@pytest.fixture
def builtin_data():
    """The data shipped inside the package (eval/, train/)."""
    from megatron_softgrpo.data import builtin

    return builtin.ROOT
