"""Shared fixtures: one single-process megatron-core world (gloo on CPU) for in-process tests,
and one small prepared corpus for the tests that train.

Multi-rank behaviour is tested by launching `torchrun` from the tests that need it; tests here
only need megatron-core's parallel state to exist at size 1.
"""

import pytest


@pytest.fixture(scope="session")
def _megatron_world_teardown():
    from spannorm_megatron.runtime import destroy

    yield
    destroy()


@pytest.fixture(scope="module")
def megatron_world(_megatron_world_teardown):
    """A world of one with megatron-core's groups. In-process CLI tests (tools' mains) tear
    their world down on the way out, so each test module sets it up again if it is gone."""
    from megatron.core import parallel_state

    from spannorm_megatron.runtime import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(seed=1234)


@pytest.fixture
def seeded(megatron_world):
    """Reset every RNG megatron-core draws from, so each test sees the same initial weights."""
    import torch
    from megatron.core import tensor_parallel

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(data prefix, tokenizer model) of a 1 MB slice of the embedded corpus, for training runs."""
    from _training import prepare_corpus

    return prepare_corpus(tmp_path_factory.mktemp("corpus"))


def pytest_configure(config):
    # megatron-core warns at import and build time about optional fused kernels (Apex, TE) and
    # deprecated arguments it passes itself; none of it concerns what the tests check.
    for category in ("UserWarning", "DeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"ignore::{category}")
