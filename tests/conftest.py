"""Shared fixtures: one single-process megatron-core world (gloo on CPU) for in-process tests,
and one small prepared corpus for the tests that train.

Multi-rank behaviour is tested by launching `torchrun` (tests/launch.py) from the tests that
need it; they request the `torchrun` fixture, which marks them `torchrun`. Tests here only need
megatron-core's parallel state to exist at size 1.

Markers: `torchrun` (derived: the test or one of its fixtures launches ranks) and `slow` (from
measured durations, `--durations=0`: a test of about two seconds or more, marked where it is
written, or every test of a fixture that costs that much, derived from the fixture requesting
`slow`). `tools/run_tests.sh --fast` runs neither.
"""

import os

import pytest

import launch


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

    from spannorm_megatron.process import initialize

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


_ATTENTION_BACKEND_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
_GIVEN_ENVIRONMENT = {name: os.environ.get(name) for name in _ATTENTION_BACKEND_VARIABLES}


@pytest.fixture(autouse=True)
def _attention_backend_environment():
    """megatron-core records the attention backend of every model it builds in the process
    environment (NVTE_FLASH_ATTN, NVTE_FUSED_ATTN, NVTE_UNFUSED_ATTN; LanguageModule.
    _set_attention_backend) and asserts that a later model agrees. A run is one process per
    launch, so that holds there; here many tests (and module fixtures) build models in one
    process and launch runs that inherit its environment, so every test starts from the
    environment the session was given."""
    for name, value in _GIVEN_ENVIRONMENT.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    yield


@pytest.fixture(scope="session")
def torchrun():
    """`launch.torchrun`. Requesting it, directly or through a fixture, marks a test `torchrun`."""
    return launch.torchrun


@pytest.fixture(scope="session")
def slow():
    """Requested by a fixture that takes seconds to make: every test using it is marked `slow`."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in ("torchrun", "slow"):
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, name))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    launch.current_test = item
    try:
        yield
    finally:
        launch.current_test = None


def pytest_configure(config):
    config.addinivalue_line("markers", "torchrun: launches several ranks through torchrun "
                            "(derived from the `torchrun` fixture)")
    config.addinivalue_line("markers", "slow: takes seconds (measured); not in the fast tier")
    # megatron-core warns at import and build time about optional fused kernels (Apex, TE) and
    # deprecated arguments it passes itself; none of it concerns what the tests check.
    for category in ("UserWarning", "DeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"ignore::{category}")
