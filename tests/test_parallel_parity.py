"""Every parallel layout computes the same model as one process: losses, gradient norms, norm-gain
gradients (with and without sequence parallelism), MoE routing and aux loss, and the weights
after 3 optimizer steps; plus SpanNorm's Scale Init using the whole model's depth under PP.

One 4-rank `torchrun` runs all layouts x placements (tests/_parity_worker.py); the reference
runs in this process. See tests/_parity.py for the harness.
"""

import pytest
import torch
from megatron.core import dist_checkpointing

import _parity
import launch
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.model import build_gpt_model, transformer_config

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4

CASES = [(layout, combo) for layout, parallel in _parity.LAYOUTS.items()
         for combo, (_, moe) in _parity.COMBOS.items() if _parity.applies(parallel, moe)] + [
    (layout, recipe) for layout, (_, recipe) in _parity.RECIPE_LAYOUTS.items()]


def layout_of(name: str):
    return _parity.LAYOUTS[name] if name in _parity.LAYOUTS else _parity.RECIPE_LAYOUTS[name][0]


@pytest.fixture(scope="module")
def parity(megatron_world, torchrun, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ref_dir, out_dir = root / "ref", root / "out"
    reference = {}
    for combo in [*_parity.COMBOS, *_parity.RECIPES]:
        placement, moe, overrides = _parity.model_of(combo)
        torch.manual_seed(7)
        config = _parity.model_config(placement, moe, **overrides)
        model = build_gpt_model(config, transformer_config(config))
        init_dir = ref_dir / combo / "init"
        init_dir.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(init_dir))
        reference[combo] = _parity.run(placement, moe, ParallelConfig(), str(init_dir),
                                       str(ref_dir / combo / "final"), overrides)

    result = torchrun(launch.TESTS / "_parity_worker.py", ref_dir, out_dir, nproc=4,
                      timeout=1200)
    launch.check_launch(result, out_dir)
    return reference, ref_dir, out_dir


def layout_records(out_dir, layout, combo):
    return launch.rank_results(out_dir / layout / combo, 4)


def load_single_process(combo, checkpoint_dir):
    """Named parameters of a checkpoint, whatever layout saved it, in one process."""
    placement, moe, overrides = _parity.model_of(combo)
    config = _parity.model_config(placement, moe, **overrides)
    model = build_gpt_model(config, transformer_config(config))
    loaded = dist_checkpointing.load({"chunk0": model.sharded_state_dict()}, str(checkpoint_dir))
    model.load_state_dict(loaded["chunk0"])
    return [(name, param.detach()) for name, param in model.named_parameters()]


def assert_close_relative(actual, expected, rtol, what):
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=rtol), f"{what} at step {step + 1}: {a} vs {e}"


@pytest.mark.parametrize("layout,combo", CASES, ids=[f"{l}-{c}" for l, c in CASES])
def test_layout_matches_single_process(parity, layout, combo):
    reference, ref_dir, out_dir = parity
    ref = reference[combo]
    records = layout_records(out_dir, layout, combo)
    parallel = layout_of(layout)
    placement, moe, _ = _parity.model_of(combo)

    # Losses (reported by the last pipeline stage) and gradient norms (every rank).
    last_stage = [r for r in records if r["losses"][0] is not None]
    assert last_stage
    for record in last_stage:
        assert_close_relative(record["losses"], ref["losses"], LOSS_RTOL, "loss")
    for record in records:
        assert_close_relative(record["grad_norms"], ref["grad_norms"], LOSS_RTOL, "grad norm")

    # Norm gains: each rank holds some (PP) or replicas (TP, DP); with sequence parallelism the
    # gradients are partial sums until megatron-core reduces them over the TP group.
    if not parallel.use_distributed_optimizer:
        gathered = {}
        for record in records:
            gathered.update(record["norm_grads"])
        assert gathered.keys() == ref["norm_grads"].keys()
        for name, grad in gathered.items():
            expected = torch.tensor(ref["norm_grads"][name])
            assert _parity.relative_error(torch.tensor(grad), expected) <= LOSS_RTOL, name

    if moe:
        for record in records:
            assert record["tokens_per_expert"] == ref["tokens_per_expert"]
            assert record["router_losses_per_layer"].keys() == ref["router_losses_per_layer"].keys()
            for name, values in ref["router_losses_per_layer"].items():
                assert_close_relative(record["router_losses_per_layer"][name], values,
                                      LOSS_RTOL, name)
        # Aux-loss-free balancing: after every step, each layer's expert bias (held by the
        # ranks of its stage) is exactly the single process's; its updates are sign steps of
        # token counts, so any miscount would show as a whole step.
        if "expert_bias" in ref:
            for step, expected in enumerate(ref["expert_bias"]):
                gathered = {}
                for record in records:
                    for layer, bias in record["expert_bias"][step].items():
                        assert gathered.setdefault(layer, bias) == bias, (step, layer)
                assert gathered == expected, f"expert bias after step {step + 1}"
            for record in records:
                assert {int(k): v for k, v in record["logged_expert_bias"].items()} == {
                    int(k): v for k, v in ref["expert_bias"][-1].items()}

    # Scale Init counts every layer of the model, not a stage's: L = 4 here, 2 per stage.
    if placement in ("spannorm", "prenorm"):  # sigma/sqrt(L) and sigma/sqrt(2L)
        depth_factor = 4 if placement == "spannorm" else 2 * 4
        for record in records:
            assert record["fresh_output_projection_std"] == pytest.approx(
                _parity.SIGMA / depth_factor ** 0.5, rel=0.05)

    # Weights after 3 steps, gathered by loading the layout's checkpoint into one process.
    actual = load_single_process(combo, out_dir / layout / combo / "final")
    expected = dict(load_single_process(combo, ref_dir / combo / "final"))
    for name, param in actual:
        error = _parity.relative_error(param, expected[name])
        assert error <= PARAM_RTOL, f"{name}: relative error {error:.2e}"
