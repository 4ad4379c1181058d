"""Fresh-process side of tests/test_checkpoint.py.

    torchrun --standalone --nproc_per_node 2 tests/_checkpoint_worker.py layouts ROOT
        For every 2-rank layout in LAYOUTS: load ROOT/<source> (saved by the test in one
        process), train RESUME_STEPS steps, save ROOT/out/<layout>, train AFTER_STEPS more;
        write ROOT/out/<layout>/rank<r>.json with the losses (tests/launch.py's protocol).
    python tests/_checkpoint_worker.py resume OUT.pt STEPS THREADS local=CKPT distributed=CKPT
        One process: for each checkpoint (dropout model; local or distributed optimizer), load
        it, train STEPS steps; torch.save losses, learning rates and every tensor to OUT.pt.
    torchrun --standalone --nproc_per_node 2 tests/_checkpoint_worker.py ep_rng ROOT
        EP2 x DP2 MoE with dropout: N steps, save (RNG sharded per rank, as Megatron-LM does
        under EP), N more; then a fresh model under other seeds loads it and trains N steps.
        Writes ROOT/ep_rng/rank<r>.json: both runs' losses and learning rates, whether every
        tensor and this rank's RNG state came back bit for bit, and its expert RNG stream.
    python tests/_checkpoint_worker.py crash SAVE_DIR MODE
        One process (its own process group): save iteration 1, train, then the group dies by
        SIGKILL in the middle of the next save
        (MODE after_shards: iteration 2, once the shards are written; between_renames: iteration
        1 again, after the old copy was moved aside and before the new one is renamed in).
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import os
import signal
import sys

import _checkpoint as H
import torch

from launch import reporting, write_result
from spannorm_megatron.checkpoint import load_checkpoint, manifest, save_checkpoint
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.process import initialize
from spannorm_megatron.runtime import destroy

RESUME_STEPS = 3
AFTER_STEPS = 2

LAYOUTS = {  # name -> (parallel config, source checkpoint saved by the test, see SOURCES)
    "tp2_sp": (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                              use_distributed_optimizer=True), "dense"),
    "dp2": (ParallelConfig(use_distributed_optimizer=True), "dense"),
    "pp2_vpp2": (ParallelConfig(pipeline_model_parallel_size=2,
                                virtual_pipeline_model_parallel_size=2,
                                use_distributed_optimizer=True), "dense"),
    "ep2_moe": (ParallelConfig(expert_model_parallel_size=2, use_distributed_optimizer=True),
                "moe"),
    "pp2_local": (ParallelConfig(pipeline_model_parallel_size=2), "dense_local"),
}
SOURCES = {  # name -> distributed optimizer? (the test saves each under TP1 / EP1)
    "dense": True, "moe": True, "dense_local": False,
}


def config_for(source: str):
    return H.model_config(moe=source == "moe")


def layouts(root: str) -> None:
    out = os.path.join(root, "out")
    for name, (parallel, source) in LAYOUTS.items():
        with reporting(os.path.join(out, name)):
            initialize(parallel, seed=4321)
            config = config_for(source)
            chunks, optimizer, scheduler = H.build(config, parallel)
            info = load_checkpoint(os.path.join(root, source), chunks, optimizer, scheduler,
                                   model_config=config, parallel_config=parallel)
            resumed = H.train(chunks, optimizer, scheduler, info["consumed_train_samples"],
                              RESUME_STEPS)
            iteration = info["iteration"] + RESUME_STEPS
            save_checkpoint(os.path.join(out, name), iteration, chunks, optimizer, scheduler,
                            model_config=config, parallel_config=parallel,
                            consumed_train_samples=resumed["consumed_samples"],
                            args={"layout": name})
            after = H.train(chunks, optimizer, scheduler, resumed["consumed_samples"],
                            AFTER_STEPS)
            record = {"loaded": {k: v for k, v in info.items() if k != "run_record"},
                      "resumed": resumed, "after": after}
        write_result(os.path.join(out, name), record)
    destroy()


def resume(out: str, steps: str, threads: str, *checkpoints: str) -> None:
    """Each of `checkpoints` is OPTIMIZER=DIR, OPTIMIZER `local` or `distributed`."""
    torch.set_num_threads(int(threads))
    initialize(seed=999)  # other seeds than the saving run: the checkpoint must restore them
    config = H.model_config(dropout=True)
    results = {}
    for spec in checkpoints:
        kind, checkpoint = spec.split("=", 1)
        parallel = ParallelConfig(use_distributed_optimizer=kind == "distributed")
        chunks, optimizer, scheduler = H.build(config, parallel)
        info = load_checkpoint(checkpoint, chunks, optimizer, scheduler,
                               model_config=config, parallel_config=parallel)
        result = H.train(chunks, optimizer, scheduler, info["consumed_train_samples"], int(steps))
        results[kind] = {"iteration": info["iteration"], "train": result,
                         "tensors": H.sharded_tensors(chunks, optimizer)}
    torch.save(results, out)
    destroy()


def _same(a, b) -> bool:
    """Generator states (tensors, numpy arrays, tuples, dicts of them) equal bit for bit."""
    import numpy as np

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _live_rng_state() -> dict:
    """This rank's generator states as a save records them, less what a CPU save writes for a
    GPU loader (fresh CUDA streams from the run's seed, not states of this process)."""
    from spannorm_megatron.checkpoint import rng

    state = rng._local_state()
    if state["device_type"] == "cpu":
        del state["cuda_rng_state"], state["rng_tracker_states"]
    return state


def ep_rng(root: str) -> None:
    from spannorm_megatron.checkpoint import read_run_record, rng

    n = 2
    parallel = ParallelConfig(expert_model_parallel_size=2, use_distributed_optimizer=True)
    config = H.model_config(dropout=True, moe=True)
    checkpoint = os.path.join(root, "ckpt")
    with reporting(os.path.join(root, "ep_rng")):
        initialize(parallel, seed=1234)
        chunks, optimizer, scheduler = H.build(config, parallel)
        H.train(chunks, optimizer, scheduler, 0, n)
        save_checkpoint(checkpoint, n, chunks, optimizer, scheduler, model_config=config,
                        parallel_config=parallel, consumed_train_samples=n * H.GLOBAL_BATCH)
        saved_rng = _live_rng_state()
        expected = H.train(chunks, optimizer, scheduler, n * H.GLOBAL_BATCH, n)
        expected_tensors = H.sharded_tensors(chunks, optimizer)

        # New model-parallel groups and other seeds (the checkpoint must restore them); the
        # default group stays, as between the layouts above (re-creating it on the same
        # rendezvous store can pair the ranks' groups wrongly).
        initialize(parallel, seed=999)
        chunks, optimizer, scheduler = H.build(config, parallel)
        info = load_checkpoint(checkpoint, chunks, optimizer, scheduler, model_config=config,
                               parallel_config=parallel)
        restored_rng = _live_rng_state()
        resumed = H.train(chunks, optimizer, scheduler, info["consumed_train_samples"], n)
        tensors = H.sharded_tensors(chunks, optimizer)
        record = {
            "rng_sharding": read_run_record(checkpoint)["rng_sharding"],
            "loaded_rng": info["loaded_rng"],
            "rng_restored": _same(saved_rng, restored_rng),
            "expert_stream": saved_rng[rng.CPU_TRACKER_KEY]["expert-parallel-rng"].tolist(),
            "expected": expected, "resumed": resumed,
            "tensors_equal": tensors.keys() == expected_tensors.keys() and all(
                torch.equal(tensors[k], expected_tensors[k]) for k in tensors),
        }
    write_result(os.path.join(root, "ep_rng"), record)
    destroy()


def crash(save_dir: str, mode: str) -> None:
    initialize(seed=1234)
    config, parallel = H.model_config(), ParallelConfig()
    chunks, optimizer, scheduler = H.build(config, parallel)
    H.train(chunks, optimizer, scheduler, 0, 1)

    def save(iteration):
        save_checkpoint(save_dir, iteration, chunks, optimizer, scheduler,
                        model_config=config, parallel_config=parallel,
                        consumed_train_samples=iteration * H.GLOBAL_BATCH)

    save(1)
    H.train(chunks, optimizer, scheduler, H.GLOBAL_BATCH, 1)
    # The whole process group, as when a node dies: megatron-core's writer helper processes too.
    die = lambda *_args, **_kwargs: os.killpg(os.getpgid(0), signal.SIGKILL)  # noqa: E731
    if mode == "after_shards":
        manifest.collect_entries = die
        save(2)
    elif mode == "between_renames":
        rename = os.rename

        def rename_then_die(src, dst):
            rename(src, dst)
            if ".old-" in os.path.basename(dst):  # the old copy was just moved aside
                die()

        os.rename = rename_then_die
        save(1)
    raise SystemExit(f"mode {mode!r} did not crash")


if __name__ == "__main__":
    {"layouts": layouts, "resume": resume, "crash": crash,
     "ep_rng": ep_rng}[sys.argv[1]](*sys.argv[2:])
