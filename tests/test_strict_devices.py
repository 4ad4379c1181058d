"""Device discipline, checked on CPU: the training loop under strict device mode.

On a GPU a tensor made without `device=` lives in host memory: NCCL refuses it and an op that
meets a CUDA tensor with it raises. On CPU both are the same memory, so only strict device mode
(`runtime/strict_devices.py`) makes such a tensor fail here. Each layout below trains with
evaluation, a loss spike check, a non-finite step, checkpoints and TensorBoard (with the
parameter norm and zero count), then resumes. The mutation tests show that the mode would see
it: a host tensor planted into each collective path of a run (tests/_strict_mutations.py) is
refused.
"""

import os
import textwrap

import pytest

import launch
from _strict_mutations import MUTATIONS
from _training import SMALL, STRICT_DEVICES as STRICT, logged_losses, train_jobs

LAYOUTS = {
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_1f1b": ["--pipeline-model-parallel-size", "2"],
    "pp2_interleaved": ["--pipeline-model-parallel-size", "2",
                        "--virtual-pipeline-model-parallel-size", "2", "--num-layers", "4"],
    # Every MoE feature of examples/configs: sigmoid scores with expert bias (DeepSeek), z-loss,
    # sequence- and global-level aux losses, and a capacity that drops tokens (Mixtral CPU).
    "ep2_moe": ["--num-experts", "4", "--moe-router-topk", "2",
                "--expert-model-parallel-size", "2", "--moe-router-score-function", "sigmoid",
                "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3",
                "--moe-router-load-balancing-type", "seq_aux_loss", "global_aux_loss",
                "--moe-aux-loss-coeff", "1e-2", "1e-2", "--moe-z-loss-coeff", "1e-3",
                "--moe-expert-capacity-factor", "1.0", "--moe-token-drop-policy", "probs"],
    "dp2_distributed_optimizer": ["--use-distributed-optimizer"],
}


@pytest.fixture(scope="module")
def strict_jobs(corpus, torchrun, tmp_path_factory):
    """(results, folder): every layout's run under strict device mode, then its resume, all in
    one launch (`_training.train_jobs`). A run trains 5 iterations with a NaN at 2 (the guard
    skips it), evaluates at 3 and saves at 5; its resume trains 6 and 7."""
    data, tokenizer = corpus
    root = tmp_path_factory.mktemp("strict_jobs")
    jobs = {}
    for layout, layout_flags in LAYOUTS.items():
        flags = [*SMALL, *layout_flags, "--data-path", data, "--tokenizer-model", tokenizer,
                 "--log-interval", "2", "--eval-interval", "3", "--eval-iters", "2",
                 "--save", root / layout / "ckpt", "--save-interval", "5",
                 "--lr-decay-iters", "7", "--tensorboard-dir", root / layout / "tb",
                 "--log-params-norm", "--log-num-zeros-in-grad", "--moe-per-layer-logging"]
        jobs[f"{layout}-first"] = {"flags": [*flags, "--train-iters", "5"], "nan_at": [2]}
        jobs[f"{layout}-resumed"] = {"flags": [*flags, "--train-iters", "7",
                                               "--load", root / layout / "ckpt"]}
    return train_jobs(jobs, root / "launch", env=STRICT), root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_loop_keeps_every_tensor_on_the_device(strict_jobs, layout):
    results, root = strict_jobs
    first = results[f"{layout}-first"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    assert "DeviceDisciplineError" not in first.stderr
    assert "iteration 2: non-finite gradients" in first.stdout
    assert "validation loss at iteration 3" in first.stdout

    resumed = results[f"{layout}-resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "successfully loaded checkpoint" in resumed.stdout
    assert sorted(logged_losses(resumed.stdout)) == [6, 7]
    assert os.listdir(root / layout / "tb")


PROBE = textwrap.dedent("""
    import threading
    import torch, torch.distributed as dist
    from spannorm_megatron.runtime import current_device, destroy
    from spannorm_megatron.process import initialize
    from spannorm_megatron.runtime.strict_devices import DeviceDisciplineError

    initialize(seed=1)
    device = torch.ones(3, device=current_device())
    outcomes = {}

    def attempt(name, fn):
        try:
            fn()
            outcomes[name] = "ok"
        except DeviceDisciplineError:
            outcomes[name] = "refused"

    attempt("all_reduce_host", lambda: dist.all_reduce(torch.zeros(3)))
    attempt("all_reduce_device", lambda: dist.all_reduce(torch.zeros(3, device=current_device())))
    attempt("all_reduce_moved", lambda: dist.all_reduce(torch.zeros(3).to(current_device())))
    attempt("all_reduce_gloo_group", lambda: dist.all_reduce(
        torch.zeros(3), group=dist.new_group([0], backend="gloo")))
    attempt("add_host_vector", lambda: device + torch.zeros(3))
    attempt("add_host_scalar", lambda: device + torch.tensor(2.0))
    attempt("inplace_into_host", lambda: torch.zeros(3).add_(device))
    attempt("like_follows_input", lambda: device + torch.zeros_like(device))
    attempt("device_attribute", lambda: device + torch.zeros(3, device=device.device))
    attempt("moved_to_host", lambda: device + device.cpu())
    attempt("index_with_host", lambda: device[torch.tensor([0, 2])])
    attempt("copy_from_host", lambda: device.clone().copy_(torch.zeros(3)))
    attempt("host_scalar_into_device", lambda: device.clone().add_(torch.tensor(1.0)))
    attempt("where_with_host_scalars", lambda: torch.where(device > 1, torch.tensor(1.0), 0.0))
    attempt("device_into_host_scalar", lambda: torch.tensor(0.0).add_(device.sum()))
    attempt("stack_with_host_scalar", lambda: torch.stack([device.sum(), torch.tensor(1.0)]))

    def filled_then_reduced(fill):
        buffer = torch.zeros(3)
        fill(buffer)
        dist.all_reduce(buffer)

    attempt("copied_into_host_then_reduced", lambda: filled_then_reduced(
        lambda b: b.copy_(device)))
    attempt("sliced_into_host_then_reduced", lambda: filled_then_reduced(
        lambda b: b.__setitem__(slice(0, 3), device)))
    attempt("index_put_into_host", lambda: filled_then_reduced(
        lambda b: b.index_put_((torch.tensor([0, 1, 2]),), device)))
    attempt("asarray_reduced", lambda: dist.all_reduce(torch.asarray([1.0, 2.0])))
    attempt("asarray_of_device_reduced", lambda: dist.all_reduce(torch.asarray(device)))
    attempt("legacy_constructor_reduced", lambda: dist.all_reduce(torch.DoubleTensor([1.0])))
    attempt("tensor_constructor_reduced", lambda: dist.all_reduce(torch.Tensor([1.0])))
    made = []
    thread = threading.Thread(target=lambda: made.append(torch.zeros(3)))
    thread.start()
    thread.join()
    attempt("made_in_a_thread_reduced", lambda: dist.all_reduce(made[0]))
    print(sorted(outcomes.items()))
    destroy()
""")


@pytest.mark.slow
def test_strict_mode_refuses_what_a_gpu_refuses_and_allows_what_it_allows():
    result = launch.python("-c", PROBE, timeout=300, env=STRICT)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = dict(eval(result.stdout.strip().splitlines()[-1]))
    assert outcomes == {
        "all_reduce_host": "refused",
        "all_reduce_device": "ok",
        "all_reduce_moved": "ok",
        "all_reduce_gloo_group": "ok",
        "add_host_vector": "refused",
        "add_host_scalar": "ok",
        "inplace_into_host": "refused",
        "like_follows_input": "ok",
        "device_attribute": "ok",
        "moved_to_host": "refused",
        "index_with_host": "ok",
        "copy_from_host": "ok",
        # In-place: CUDA admits a 0-dim host tensor as an input, never as the written output.
        "host_scalar_into_device": "ok",
        "where_with_host_scalars": "ok",
        "device_into_host_scalar": "refused",
        "stack_with_host_scalar": "refused",
        # A host buffer stays a host buffer, whatever is written into it.
        "copied_into_host_then_reduced": "refused",
        "sliced_into_host_then_reduced": "refused",
        "index_put_into_host": "refused",
        # Factories the mode did not see before, and other threads.
        "asarray_reduced": "refused",
        "asarray_of_device_reduced": "ok",
        "legacy_constructor_reduced": "refused",
        "tensor_constructor_reduced": "refused",
        "made_in_a_thread_reduced": "refused",
    }


@pytest.fixture(scope="module")
def mutation_outcomes(corpus, tmp_path_factory, torchrun):
    """Every rank's record of tests/_strict_mutations.py: one launch for all the mutations."""
    data, tokenizer = corpus
    out = tmp_path_factory.mktemp("mutations")
    flags = [*SMALL, *LAYOUTS["ep2_moe"], "--data-path", data, "--tokenizer-model", tokenizer,
             "--train-iters", "20", "--eval-interval", "1", "--eval-iters", "1",
             "--log-params-norm", "--log-num-zeros-in-grad"]
    result = torchrun(launch.TESTS / "_strict_mutations.py", out, "--", *flags, timeout=900,
                      env=STRICT)
    launch.check_launch(result, out)
    return launch.rank_results(out, 2)


def test_unmutated_rounds_pass_on_every_rank(mutation_outcomes):
    for record in mutation_outcomes:
        unmutated = {name: outcome for name, outcome in record.items() if name not in MUTATIONS}
        assert len(unmutated) == len(MUTATIONS) + 2  # one after each, and the two baselines
        assert set(unmutated.values()) == {"passed"}, unmutated


@pytest.mark.parametrize("path", sorted(MUTATIONS))
def test_a_host_tensor_planted_in_a_collective_path_is_refused(mutation_outcomes, path):
    for record in mutation_outcomes:
        assert record[path].startswith("refused: "), (path, record[path])
        assert "host tensor" in record[path]
