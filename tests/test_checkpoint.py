"""Checkpoints: Megatron-LM layout, exact round trip, bitwise resume in a fresh process, resharding
between layouts (model and distributed-optimizer state), crash safety and clear errors.

Real files and real megatron-core models throughout (tests/_checkpoint.py). Fresh processes run
tests/_checkpoint_worker.py: one 2-rank torchrun for every layout change, one process for the
bitwise resume, one per simulated kill.
"""

import glob
import os
import shutil

import pytest
import torch

import _checkpoint as H
import launch
from spannorm_megatron.checkpoint import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    manifest,
    read_run_record,
    save_checkpoint,
)
from spannorm_megatron.checkpoint import state
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.runtime import set_seed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_checkpoint_worker.py")
LOSS_RTOL = 1e-5
LOCAL = ParallelConfig()
DISTOPT = ParallelConfig(use_distributed_optimizer=True)


def _run(args, timeout=300):
    # A session of its own: the crash worker kills its whole process group.
    return launch.python(WORKER, *args, timeout=timeout, start_new_session=True)


def _fresh(config, parallel=LOCAL, seed=1234):
    set_seed(seed)
    return H.build(config, parallel)


def _save(save_dir, iteration, chunks, optimizer, scheduler, config, parallel=LOCAL, **kwargs):
    return save_checkpoint(save_dir, iteration, chunks, optimizer, scheduler, model_config=config,
                           parallel_config=parallel,
                           consumed_train_samples=iteration * H.GLOBAL_BATCH, **kwargs)


def _load(load_dir, chunks, optimizer, scheduler, config, parallel=LOCAL, **kwargs):
    return load_checkpoint(load_dir, chunks, optimizer, scheduler, model_config=config,
                           parallel_config=parallel, **kwargs)


def _assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def _groups(optimizer):
    """Hyperparameters of every param group, and every parameter's Adam step."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "step")}
              for g in optimizer.param_groups]
    steps = [float(state["step"]) for inner in optimizer.chained_optimizers
             for state in inner.optimizer.state.values()]
    return groups, steps


def _tree(directory):
    """Every file under `directory` with its size and modification time."""
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------ layout, round trip

@pytest.mark.slow
@pytest.mark.parametrize("parallel", [LOCAL, DISTOPT], ids=["local_optimizer", "distributed"])
def test_save_then_load_restores_everything(megatron_world, tmp_path, parallel):
    config = H.model_config(dropout=True)
    chunks, optimizer, scheduler = _fresh(config, parallel)
    H.train(chunks, optimizer, scheduler, 0, 3)
    path = _save(tmp_path, 3, chunks, optimizer, scheduler, config, parallel,
                 consumed_valid_samples=7, args={"note": "round trip"})

    # Megatron-LM's layout, plus our run record and manifest.
    assert path == str(tmp_path / "iter_0000003")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    names = set(os.listdir(path))
    assert {"common.pt", "metadata.json", ".metadata", "run.json", "manifest.json"} <= names
    assert any(name.endswith(".distcp") for name in names)
    listed = manifest.read(path)["files"]
    assert set(listed) == names - {"manifest.json"}
    assert not glob.glob(str(tmp_path / "*.tmp-*"))

    record = read_run_record(str(tmp_path))
    assert record == read_run_record(path)
    assert record["norm_placement"] == "spannorm"
    assert record["model_config"] == config.to_dict()
    assert record["parallel_config"]["use_distributed_optimizer"] == \
        parallel.use_distributed_optimizer
    assert record["layout"]["tensor_model_parallel_size"] == 1
    assert set(record["versions"]) == {"torch", "megatron-core", "spannorm_megatron"}
    assert record["args"] == {"note": "round trip"}
    assert find_latest(str(tmp_path)) == 3

    expected = H.sharded_tensors(chunks, optimizer)
    expected_groups = _groups(optimizer)
    expected_scheduler = scheduler.state_dict()
    expected_rng = torch.get_rng_state()

    chunks2, optimizer2, scheduler2 = _fresh(config, parallel, seed=99)
    info = _load(tmp_path, chunks2, optimizer2, scheduler2, config, parallel)
    assert (info["iteration"], info["consumed_train_samples"], info["consumed_valid_samples"]) \
        == (3, 3 * H.GLOBAL_BATCH, 7)
    assert info["run_record"] == record and info["loaded_optimizer"] and info["loaded_rng"]
    _assert_same_tensors(H.sharded_tensors(chunks2, optimizer2), expected)
    assert _groups(optimizer2) == expected_groups
    assert scheduler2.state_dict() == expected_scheduler
    assert torch.equal(torch.get_rng_state(), expected_rng)


@pytest.mark.slow
def test_resume_in_fresh_process_is_bitwise_identical(megatron_world, tmp_path):
    """2N steps in one go == N steps, save, load in a new process, N steps: losses, learning
    rates and every weight and optimizer tensor, bit for bit (dropout on, LR warmup + cosine),
    with the local and with the distributed optimizer."""
    n = 3
    config = H.model_config(dropout=True)
    full, specs = {}, []
    for kind, parallel in (("local", LOCAL), ("distributed", DISTOPT)):
        chunks, optimizer, scheduler = _fresh(config, parallel)
        full[kind] = H.train(chunks, optimizer, scheduler, 0, 2 * n)
        full[kind]["tensors"] = H.sharded_tensors(chunks, optimizer)

        chunks, optimizer, scheduler = _fresh(config, parallel)
        first = H.train(chunks, optimizer, scheduler, 0, n)
        assert first["losses"] == full[kind]["losses"][:n]
        _save(tmp_path / kind, n, chunks, optimizer, scheduler, config, parallel)
        specs.append(f"{kind}={tmp_path / kind}")

    out = tmp_path / "resumed.pt"
    result = _run(["resume", str(out), str(n), str(torch.get_num_threads()), *specs])
    assert result.returncode == 0, result.stderr[-5000:]
    resumed = torch.load(out, weights_only=False)
    for kind, expected in full.items():
        assert resumed[kind]["iteration"] == n
        assert resumed[kind]["train"]["losses"] == expected["losses"][n:], kind
        assert resumed[kind]["train"]["lrs"] == expected["lrs"][n:], kind
        _assert_same_tensors(resumed[kind]["tensors"], expected["tensors"])


# ------------------------------------------------------------------------------ other layouts

@pytest.fixture(scope="module")
def layouts(megatron_world, torchrun, tmp_path_factory):
    """Sources saved here under TP1/EP1 after 3 steps, with the losses of 3 more steps; then one
    2-rank torchrun resumes them under every layout of the worker."""
    import _checkpoint_worker as W

    root = tmp_path_factory.mktemp("layouts")
    reference = {}
    for source, distributed in W.SOURCES.items():
        config, parallel = W.config_for(source), DISTOPT if distributed else LOCAL
        chunks, optimizer, scheduler = _fresh(config, parallel)
        H.train(chunks, optimizer, scheduler, 0, 3)
        _save(root / source, 3, chunks, optimizer, scheduler, config, parallel)
        reference[source] = H.train(chunks, optimizer, scheduler, 3 * H.GLOBAL_BATCH,
                                    W.RESUME_STEPS)
    result = torchrun(WORKER, "layouts", root, timeout=600)
    launch.check_launch(result, root)
    records = {name: launch.rank_results(root / "out" / name, 2) for name in W.LAYOUTS}
    return root, reference, records


def _layout_names():
    import _checkpoint_worker as W

    return list(W.LAYOUTS)


@pytest.mark.parametrize("layout", _layout_names())
def test_one_process_checkpoint_resumes_under_layout(layouts, layout):
    import _checkpoint_worker as W

    _root, reference, records = layouts
    source = W.LAYOUTS[layout][1]
    for record in records[layout]:
        assert record["loaded"]["iteration"] == 3
        assert record["loaded"]["loaded_optimizer"]
        assert record["resumed"]["lrs"] == reference[source]["lrs"]
        assert record["resumed"]["losses"] == pytest.approx(reference[source]["losses"],
                                                            rel=LOSS_RTOL)


@pytest.mark.parametrize("layout", _layout_names())
def test_layout_checkpoint_resumes_in_one_process(layouts, layout):
    import _checkpoint_worker as W

    root, _reference, records = layouts
    source = W.LAYOUTS[layout][1]
    config, parallel = W.config_for(source), DISTOPT if W.SOURCES[source] else LOCAL
    saved = read_run_record(str(root / "out" / layout))
    assert saved["layout"]["world_size"] == 2
    assert saved["args"] == {"layout": layout}
    chunks, optimizer, scheduler = _fresh(config, parallel, seed=5)
    info = _load(root / "out" / layout, chunks, optimizer, scheduler, config, parallel)
    assert info["iteration"] == 3 + W.RESUME_STEPS
    after = H.train(chunks, optimizer, scheduler, info["consumed_train_samples"], W.AFTER_STEPS)
    assert after["lrs"] == records[layout][0]["after"]["lrs"]
    assert after["losses"] == pytest.approx(records[layout][0]["after"]["losses"], rel=LOSS_RTOL)


# ------------------------------------------------------------------------------ crash safety

@pytest.mark.slow
def test_exception_mid_save_keeps_previous_checkpoint(megatron_world, tmp_path, monkeypatch):
    config = H.model_config()
    chunks, optimizer, scheduler = _fresh(config)
    H.train(chunks, optimizer, scheduler, 0, 1)
    _save(tmp_path, 1, chunks, optimizer, scheduler, config)
    good = H.sharded_tensors(chunks)
    H.train(chunks, optimizer, scheduler, H.GLOBAL_BATCH, 1)

    def fail(_directory):
        raise OSError("disk full (injected after the shards were written)")

    with monkeypatch.context() as patch:
        patch.setattr(manifest, "collect_entries", fail)
        with pytest.raises(OSError, match="injected"):
            _save(tmp_path, 2, chunks, optimizer, scheduler, config)
    leftovers = glob.glob(str(tmp_path / "iter_0000002.tmp-*"))
    assert len(leftovers) == 1 and glob.glob(os.path.join(leftovers[0], "*.distcp"))
    assert not (tmp_path / "iter_0000002").exists()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert find_latest(str(tmp_path)) == 1

    fresh = _fresh(config, seed=7)
    assert _load(tmp_path, *fresh, config)["iteration"] == 1
    _assert_same_tensors(H.sharded_tensors(fresh[0]), good)

    # The next save clears the debris.
    _save(tmp_path, 2, chunks, optimizer, scheduler, config)
    assert not glob.glob(str(tmp_path / "*.tmp-*"))
    assert find_latest(str(tmp_path)) == 2


@pytest.mark.slow
def test_resaving_an_iteration_replaces_it(megatron_world, tmp_path):
    config = H.model_config()
    chunks, optimizer, scheduler = _fresh(config)
    _save(tmp_path, 1, chunks, optimizer, scheduler, config)
    H.train(chunks, optimizer, scheduler, 0, 1)
    _save(tmp_path, 1, chunks, optimizer, scheduler, config)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    fresh = _fresh(config, seed=7)
    _load(tmp_path, *fresh, config)
    _assert_same_tensors(H.sharded_tensors(fresh[0]), H.sharded_tensors(chunks))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after_shards", "between_renames"])
def test_killed_mid_save_keeps_previous_checkpoint(megatron_world, tmp_path, mode):
    result = _run(["crash", str(tmp_path), mode])
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert find_latest(str(tmp_path)) == 1
    if mode == "between_renames":  # iter_0000001 itself is gone; its moved-aside copy is used
        assert not (tmp_path / "iter_0000001").exists()
        assert len(glob.glob(str(tmp_path / "iter_0000001.old-*"))) == 1
    config = H.model_config()
    chunks, optimizer, scheduler = _fresh(config)
    info = _load(tmp_path, chunks, optimizer, scheduler, config)
    assert info["iteration"] == 1 and info["consumed_train_samples"] == H.GLOBAL_BATCH

    # The next save restores or clears whatever the crash left.
    _save(tmp_path, 2, chunks, optimizer, scheduler, config)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002",
                                            "latest_checkpointed_iteration.txt"]
    assert manifest.is_complete(str(tmp_path / "iter_0000001"))


# ------------------------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def saved(megatron_world, tmp_path_factory):
    """A checkpoint of the default test model (iteration 2) to copy and damage."""
    root = tmp_path_factory.mktemp("saved")
    config = H.model_config()
    chunks, optimizer, scheduler = _fresh(config)
    H.train(chunks, optimizer, scheduler, 0, 2)
    _save(root, 2, chunks, optimizer, scheduler, config)
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target


def _load_fails(directory, config=None, match=None, parallel=LOCAL, **kwargs):
    """Load into a fresh model and expect a CheckpointError; check nothing was modified."""
    config = config or H.model_config()
    chunks, optimizer, scheduler = _fresh(config, parallel, seed=11)
    before = H.sharded_tensors(chunks, optimizer)
    scheduler_before = scheduler.state_dict()
    disk_before = _tree(directory) if os.path.isdir(directory) else None
    with pytest.raises(CheckpointError, match=match) as error:
        _load(directory, chunks, optimizer, scheduler, config, parallel, **kwargs)
    _assert_same_tensors(H.sharded_tensors(chunks, optimizer), before)
    assert scheduler.state_dict() == scheduler_before
    if disk_before is not None:
        assert _tree(directory) == disk_before
    return str(error.value)


def test_missing_or_empty_load_directory(megatron_world, tmp_path):
    message = _load_fails(str(tmp_path / "nowhere"), match="does not exist")
    assert str(tmp_path / "nowhere") in message
    assert find_latest(str(tmp_path / "nowhere")) is None
    (tmp_path / "empty").mkdir()
    message = _load_fails(str(tmp_path / "empty"), match="holds no checkpoint")
    assert "latest_checkpointed_iteration.txt" in message
    assert find_latest(str(tmp_path / "empty")) is None


def test_an_iteration_given_as_the_load_directory_points_to_its_parent(ckpt):
    message = _load_fails(str(ckpt / "iter_0000002"), match="is an iteration inside the "
                          "checkpoint directory")
    assert f"--load {ckpt}" in message and "latest_checkpointed_iteration.txt" in message


def test_pointer_to_missing_or_incomplete_directory(ckpt):
    pointer = ckpt / "latest_checkpointed_iteration.txt"
    pointer.write_text("5\n")
    message = _load_fails(str(ckpt), match="iter_0000005 does not exist")
    assert "iter_0000002" in message  # the complete one is named as the way out
    with pytest.raises(CheckpointError):
        find_latest(str(ckpt))

    pointer.write_text("2\n")
    os.remove(ckpt / "iter_0000002" / "manifest.json")
    _load_fails(str(ckpt), match="iter_0000002 is incomplete")

    pointer.write_text("two\n")
    _load_fails(str(ckpt), match="latest_checkpointed_iteration.txt should hold")


def test_no_pointer_uses_newest_complete_directory(ckpt):
    os.remove(ckpt / "latest_checkpointed_iteration.txt")
    shutil.copytree(ckpt / "iter_0000002", ckpt / "iter_0000009")
    os.remove(ckpt / "iter_0000009" / "manifest.json")  # incomplete: never chosen
    assert find_latest(str(ckpt)) == 2


@pytest.mark.parametrize("change,fields", [
    (dict(placement="prenorm"), ["norm_placement", "final_norm"]),
    (dict(hidden_size=64, ffn_hidden_size=128), ["hidden_size", "ffn_hidden_size"]),
    (dict(num_layers=2, num_query_groups=4, vocab_size=96), ["num_layers", "num_query_groups",
                                                             "vocab_size"]),
    (dict(normalization="LayerNorm"), ["normalization"]),
    (dict(moe=True), ["num_experts"]),
])
def test_different_model_is_refused(ckpt, change, fields):
    message = _load_fails(str(ckpt), config=H.model_config(**change), match="different model")
    for field in fields:
        assert f"{field}: checkpoint" in message
    assert "run.json" in message


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(ckpt, damage):
    shard = sorted(glob.glob(str(ckpt / "iter_0000002" / "*.distcp")))[0]
    if damage == "flip":
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(100)
    else:
        os.remove(shard)
    expected = {"flip": "is corrupted", "truncate": "has 100 bytes", "delete": "is missing"}
    message = _load_fails(str(ckpt), match="is damaged")
    assert f"{shard} {expected[damage]}" in message


def test_optimizer_kind_change_is_refused_but_weights_load(ckpt):
    config = H.model_config()
    _load_fails(str(ckpt), match="use_distributed_optimizer differs", parallel=DISTOPT)
    chunks, optimizer, scheduler = _fresh(config, DISTOPT, seed=3)
    info = _load(ckpt, chunks, optimizer, scheduler, config, DISTOPT, no_load_optim=True)
    assert not info["loaded_optimizer"] and info["iteration"] == 2
    info = _load(ckpt, chunks, optimizer, scheduler, config, DISTOPT, finetune=True)
    assert info["iteration"] == 0 and info["consumed_train_samples"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [LOCAL, DISTOPT], ids=["local_optimizer", "distributed"])
def test_non_strict_load_keeps_what_the_checkpoint_lacks(megatron_world, tmp_path, parallel):
    """A SpanNorm checkpoint without the first layer's input norm (N0), loaded into a model with
    it: refused when strict; with strict=False every saved tensor loads and N0 keeps its
    initial value."""
    saved_config = H.model_config(first_layer_input_norm=False)
    chunks, optimizer, scheduler = _fresh(saved_config, parallel)
    H.train(chunks, optimizer, scheduler, 0, 2)
    _save(tmp_path, 2, chunks, optimizer, scheduler, saved_config, parallel)
    saved_tensors = H.sharded_tensors(chunks)
    saved_with_optimizer = H.sharded_tensors(chunks, optimizer)

    config = H.model_config()
    message = _load_fails(str(tmp_path), config=config, match="different model",
                          parallel=parallel)
    assert "first_layer_input_norm: checkpoint False, this run True" in message

    chunks, optimizer, scheduler = _fresh(config, parallel, seed=3)
    initial = H.sharded_tensors(chunks)
    _load(tmp_path, chunks, optimizer, scheduler, config, parallel, strict=False)
    loaded = H.sharded_tensors(chunks)
    n0 = {key for key in loaded if "embedding_norm" in key}
    assert n0 and set(loaded) - n0 == set(saved_tensors)
    for key in n0:
        assert torch.equal(loaded[key], initial[key])
    _assert_same_tensors({k: v for k, v in loaded.items() if k not in n0}, saved_tensors)
    with_optimizer = H.sharded_tensors(chunks, optimizer)
    fresh_state = {k: v for k, v in with_optimizer.items() if "embedding_norm" in k}
    _assert_same_tensors({k: v for k, v in with_optimizer.items() if k not in fresh_state},
                         saved_with_optimizer)
    for key, value in fresh_state.items():  # N0's optimizer state starts fresh
        assert key.startswith("decoder") or not value.any() or ".param." in key, key
    H.train(chunks, optimizer, scheduler, 2 * H.GLOBAL_BATCH, 1)  # and training goes on


@pytest.mark.slow
def test_save_before_the_first_step(megatron_world, tmp_path):
    """Iteration 0 (a never-stepped distributed optimizer has no state yet) saves and loads."""
    config = H.model_config()
    chunks, optimizer, scheduler = _fresh(config, DISTOPT)
    _save(tmp_path, 0, chunks, optimizer, scheduler, config, DISTOPT)
    expected = H.train(chunks, optimizer, scheduler, 0, 2)
    fresh = _fresh(config, DISTOPT, seed=8)
    assert _load(tmp_path, *fresh, config, DISTOPT)["iteration"] == 0
    assert H.train(*fresh, 0, 2) == expected


def test_streaming_save_writes_each_produced_tensor_once_in_order(megatron_world, tmp_path):
    """A model built on the meta device, saved with `StreamingSaveStrategy`: every tensor is
    produced once, in the producer's order, and loading gives back exactly what was produced."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from spannorm_megatron.checkpoint import state as ckpt_state
    from spannorm_megatron.checkpoint.streaming import StreamingSaveStrategy
    from spannorm_megatron.model import build_model, transformer_config

    config = H.model_config(moe=True)
    source, _optimizer, _scheduler = _fresh(config)
    described = ckpt_state.model_state(source, dict(ckpt_state.SHARDING_METADATA))
    apply_factories(described)  # SwiGLU's fc1 becomes its two halves, as the writer sees it
    values = {(t.key, tuple(t.global_offset)): t.data for t in nested_values(described)
              if isinstance(t, ShardedTensor)}

    produced = []

    def produce(shard):
        produced.append((shard.key, tuple(shard.global_offset)))
        return values[produced[-1]].clone()

    with torch.device("meta"):
        meta_chunks = build_model(config, transformer_config(
            config, use_cpu_initialization=True, perform_initialization=False))
    _save(tmp_path, 3, meta_chunks, None, None, config, no_save_rng=True,
          sharded_strategy=StreamingSaveStrategy(produce, order=lambda shard: shard.key))

    assert sorted(produced) == sorted(values) and len(set(produced)) == len(produced)
    keys = [key for key, _offset in produced]
    assert keys == sorted(keys)
    fresh, optimizer, scheduler = _fresh(config, seed=99)
    assert _load(tmp_path, fresh, optimizer, scheduler, config, no_load_optim=True,
                 no_load_rng=True)["iteration"] == 3

    def weights(chunk):
        return {k: v for k, v in ckpt_state.unwrap(chunk).state_dict().items()
                if isinstance(v, torch.Tensor)}

    _assert_same_tensors(weights(fresh[0]), weights(source[0]))


class _ExtraStateHolder(torch.nn.Module):
    """What a Transformer Engine module adds to a state dict: `_extra_state` (its FP8 scaling
    history), through torch's own get_extra_state/set_extra_state protocol."""

    def __init__(self):
        super().__init__()
        self.restored = None

    def get_extra_state(self):
        return {"amax_history": [1.0, 2.0]}

    def set_extra_state(self, value):
        self.restored = value


def test_checkpoint_without_extra_state_loads_into_a_model_with_it(megatron_world, tmp_path):
    """Local, CPU-made and HF-imported checkpoints lack TE's `*._extra_state`; a model that has
    it loads them strictly, and the extra state starts afresh. (A missing tensor of any other
    kind is still refused: test_non_strict_load_keeps_what_the_checkpoint_lacks.)"""
    config = H.model_config()
    chunks, optimizer, scheduler = _fresh(config, LOCAL)
    H.train(chunks, optimizer, scheduler, 0, 1)
    _save(tmp_path, 1, chunks, optimizer, scheduler, config, LOCAL)
    saved = H.sharded_tensors(chunks, optimizer)

    chunks, optimizer, scheduler = _fresh(config, LOCAL, seed=3)
    holder = _ExtraStateHolder()
    state.unwrap(chunks[0]).decoder.layers[0].te_like = holder
    assert any(k.endswith("te_like._extra_state")
               for k in state.unwrap(chunks[0]).state_dict())
    _load(tmp_path, chunks, optimizer, scheduler, config, LOCAL)
    _assert_same_tensors(H.sharded_tensors(chunks, optimizer), saved)
    assert holder.restored is None


def test_rng_states_of_another_device_type_are_ignored_like_a_layout_change(megatron_world):
    """CPU generator states are 5056 bytes, CUDA ones 16: a CPU checkpoint resumed on a GPU (or
    the reverse) must keep the run's own seeds instead of failing at the first RNG fork."""
    from spannorm_megatron.checkpoint import rng

    mine = rng._local_state()
    assert mine["device_type"] == "cpu" and mine["torch_rng_state"].numel() == 5056
    from_gpu = dict(mine, device_type="cuda", rng_tracker_states={
        name: torch.zeros(16, dtype=torch.uint8) for name in mine["rng_tracker_states"]})
    before = torch.get_rng_state()
    torch.rand(3)  # move the generator on, so that a restore would be visible
    moved = torch.get_rng_state()
    assert rng.restore([from_gpu]) is False
    assert torch.equal(torch.get_rng_state(), moved)
    assert rng.restore([mine]) is True
    assert torch.equal(torch.get_rng_state(), before)
    legacy = {k: v for k, v in mine.items() if k != "device_type"}  # saved before the field
    assert rng.restore([legacy]) is True


def test_cpu_save_gives_megatron_lm_cuda_states_it_can_load(megatron_world):
    """Megatron-LM loads the RNG entry on a GPU with torch.cuda.set_rng_state and installs the
    tracker states in the CUDA generator: a CPU save writes there the 16-byte CUDA states of
    the streams megatron-core's seeding made (read back from the seeds of this process's own
    CPU tracker, which that seeding set), and keeps its CPU tracker states for itself."""
    from megatron.core import tensor_parallel

    from spannorm_megatron.checkpoint import rng

    set_seed(4321)
    seeded = {name: torch.Generator().set_state(state).initial_seed()
              for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    torch.rand(3)  # the default generator moves on; the CUDA entry is the fresh stream anyway
    state = rng._local_state()
    assert state["device_type"] == "cpu"
    assert torch.equal(state["cuda_rng_state"], rng.cuda_generator_state(4321))
    assert state["cuda_rng_state"].dtype == torch.uint8 and state["cuda_rng_state"].numel() == 16
    assert {name: s.view(torch.int64).tolist() for name, s in
            state["rng_tracker_states"].items()} == {name: [seed, 0]
                                                      for name, seed in seeded.items()}
    cpu_states = state[rng.CPU_TRACKER_KEY]
    assert cpu_states.keys() == seeded.keys()
    assert all(s.numel() == 5056 for s in cpu_states.values())  # what our CPU resume restores
    set_seed(1234)


def test_expert_parallel_rng_is_saved_per_rank_and_resumes_bitwise(torchrun, tmp_path):
    """Under EP the RNG states are sharded by (pp, tp, dp) as Megatron-LM shards them (the DP
    ranks' expert streams differ); an EP2 x DP2 MoE run with dropout resumes bit for bit."""
    result = torchrun(WORKER, "ep_rng", tmp_path, timeout=600)
    launch.check_launch(result, tmp_path)
    records = launch.rank_results(tmp_path / "ep_rng", 2)
    for record in records:
        assert record["rng_sharding"] == "pp,tp,dp" and record["loaded_rng"]
        assert record["rng_restored"] and record["tensors_equal"]
        assert record["resumed"]["losses"] == record["expected"]["losses"]
        assert record["resumed"]["lrs"] == record["expected"]["lrs"]
    assert records[0]["expert_stream"] != records[1]["expert_stream"]


# ------------------------------------------------------------------------------ MoE recipes

def _expert_bias_config(**overrides):
    """DeepSeek-V3-like routing on a model with a dense first layer."""
    values = dict(moe=True, moe_layer_freq="([0]*1+[1]*3)", moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-2,
                  moe_router_load_balancing_type="none", moe_expert_capacity_factor=1.0,
                  qk_layernorm=True)
    values.update(overrides)
    return H.model_config(**values)


@pytest.mark.slow
def test_expert_bias_is_saved_recorded_and_resumed_bitwise(megatron_world, tmp_path):
    """N steps, save, N more == load into a fresh model, N steps: every tensor bit for bit,
    the aux-loss-free expert bias (a buffer megatron-core updates outside the optimizer)
    included; the run record holds the routing settings."""
    n = 2
    config = _expert_bias_config()
    chunks, optimizer, scheduler = _fresh(config)
    H.train(chunks, optimizer, scheduler, 0, n)
    _save(tmp_path, n, chunks, optimizer, scheduler, config)
    saved = H.sharded_tensors(chunks)
    biases = {k: v for k, v in saved.items() if "expert_bias" in k}
    # Three MoE layers (the first is dense), each bias moved by the sign rule (+-0.01 a step).
    assert len(biases) == 3 and all(v.abs().max() > 0 for v in biases.values()), biases
    expected = H.train(chunks, optimizer, scheduler, n * H.GLOBAL_BATCH, n)
    expected_tensors = H.sharded_tensors(chunks, optimizer)

    record = read_run_record(str(tmp_path))
    assert record["model_config"]["moe_router_enable_expert_bias"] is True
    assert record["model_config"]["moe_layer_freq"] == [0, 1, 1, 1]
    assert record["model_config"]["moe_router_bias_update_rate"] == 1e-2

    chunks, optimizer, scheduler = _fresh(config, seed=99)
    _load(tmp_path, chunks, optimizer, scheduler, config)
    _assert_same_tensors({k: v for k, v in H.sharded_tensors(chunks).items() if k in biases},
                         biases)
    resumed = H.train(chunks, optimizer, scheduler, n * H.GLOBAL_BATCH, n)
    assert resumed["losses"] == expected["losses"]
    _assert_same_tensors(H.sharded_tensors(chunks, optimizer), expected_tensors)


@pytest.mark.parametrize("change,field", [
    (dict(moe_router_enable_expert_bias=False, moe_router_bias_update_rate=None),
     "moe_router_enable_expert_bias"),
    (dict(moe_layer_freq=1), "moe_layer_pattern"),
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
          moe_router_bias_update_rate=None), "moe_router_score_function"),
    (dict(moe_expert_capacity_factor=None), "moe_expert_capacity_factor"),
    (dict(qk_layernorm=False), "qk_layernorm"),
])
def test_resume_with_other_moe_settings_is_refused_naming_them(megatron_world, tmp_path, change,
                                                               field):
    config = _expert_bias_config()
    chunks, optimizer, scheduler = _fresh(config)
    _save(tmp_path, 1, chunks, optimizer, scheduler, config)
    message = _load_fails(str(tmp_path), config=_expert_bias_config(**change),
                          match="different model")
    assert f"{field}: checkpoint" in message


def test_moe_weights_of_other_runs_settings_may_change(megatron_world, tmp_path):
    """Loss weights and the bias update rate are training settings, not the model."""
    config = _expert_bias_config()
    chunks, optimizer, scheduler = _fresh(config)
    H.train(chunks, optimizer, scheduler, 0, 1)  # the optimizer has state to save
    _save(tmp_path, 1, chunks, optimizer, scheduler, config)
    other = _expert_bias_config(moe_router_bias_update_rate=5e-3, moe_z_loss_coeff=1e-3)
    chunks, optimizer, scheduler = _fresh(other)
    assert _load(tmp_path, chunks, optimizer, scheduler, other)["iteration"] == 1
