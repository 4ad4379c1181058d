"""A seeded fuzzer of `spannorm-train`'s inputs, generated from the declared fields.

Every example is a command line: a tiny valid run (mock data, NullTokenizer, one iteration)
with a few of its flags changed. The changes come from the declarations themselves
(`options()`: type, choices, bounds, path kind), so a new flag is fuzzed without being listed:

- single values: each kind's edge cases (bounds and one past them, zero, negatives, non-finite
  numbers, unknown choices, empty and long lists, words where numbers go);
- cross-field combinations: parallel sizes x layers x virtual stages x layouts x micro-batches,
  MoE routing x balancing x capacity, sequence x positions, schedules;
- path flags: file fixtures (missing, empty, binary, truncated, a folder where a file is expected,
  a file where a folder is expected, an unwritable folder);
- environment variables the code reads.

Each example must end in one of two ways (`check_example`):
- accepted: the process builds the model and trains its step (exit 0; exit 1 with one message is
  a run that failed cleanly, e.g. a loss that is not finite);
- refused: exit 2 and one `error:` message, no traceback.

Anything else (a traceback, an exception escaping `main`, a hang) is a defect. Runs happen in
this process, one world of one rank: world sizes above one are checked as far as a single
process can (the layout is refused naming the world size, or accepted).

    python tests/fuzz_train.py --seed 7 --minutes 60      # the long mode
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import math
import os
import random
import sys
import time
import traceback
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# A run that trains one step in about a second on a CPU; every example starts from it.
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data",
        "--eval-iters", "1", "--eval-interval", "1000", "--log-interval", "1",
        "--num-workers", "0", "--transformer-impl", "local"]

# Sizes whose large values would only measure the machine's memory: fuzzed among small ones.
SIZES = {"num_layers": [0, 1, 3, 4, 6], "hidden_size": [0, 8, 30, 48, 64],
         "num_attention_heads": [0, 1, 3, 8], "ffn_hidden_size": [0, 1, 64, 100],
         "seq_length": [0, 1, 16, 31, 64], "max_sequence_length": [1, 16, 31, 64, 4096],
         "micro_batch_size": [0, 1, 3, 4], "global_batch_size": [0, 1, 3, 4, 8],
         "num_experts": [0, 1, 2, 3, 4], "vocab_size": [0, 1, 100, 256],
         "kv_channels": [0, 4, 7, 16], "num_query_groups": [0, 1, 2, 3, 4],
         "moe_ffn_hidden_size": [0, 16, 33], "moe_router_topk": [0, 1, 2, 5],
         "train_iters": [0, 1, 2], "eval_iters": [0, 1, 2], "log_interval": [0, 1, 2],
         "moe_shared_expert_intermediate_size": [0, 16, 33]}
# Flags whose values name things outside this process, or stop it, set apart from the rest.
NOT_FUZZED = {"config", "exit_duration_in_mins", "exit_interval", "exit_signal_handler"}

ENVIRONMENT = {"SPANNORM_FORCE_CPU": ["1", "yes", "maybe"], "SPANNORM_STRICT_DEVICES": ["1", "0", "x"],
               "OMP_NUM_THREADS": ["1", "0", "-3", "many"], "WORLD_SIZE": ["2", "0", "x"],
               "CUDA_DEVICE_MAX_CONNECTIONS": ["1", "x"]}


def declared_flags():
    """(owner, field) of every flag of spannorm-train."""
    from spannorm_megatron.config.options import options
    from spannorm_megatron.training.arguments import SECTIONS

    return [(owner, field) for _, owner in SECTIONS for field in options(owner)
            if field.name not in NOT_FUZZED]


def _kind(owner, field):
    from spannorm_megatron.config.options import _base_type

    kind, optional = _base_type(field, owner)
    return kind, optional


def _flag(field) -> str:
    from spannorm_megatron.config.options import flag_of

    return flag_of(field)


class Fixtures:
    """Files and folders of every shape a path flag may be given."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.paths = {}
        for name, content in (("empty", b""), ("binary", bytes(range(256)) * 8),
                              ("text", b"not what you expected\n"),
                              ("truncated.idx", b"MMIDIDX\x00\x00\x01")):
            path = os.path.join(root, name)
            with open(path, "wb") as f:
                f.write(content)
            self.paths[name] = path
        self.paths["folder"] = os.path.join(root, "folder")
        os.makedirs(self.paths["folder"], exist_ok=True)
        self.paths["missing"] = os.path.join(root, "no", "such", "thing")
        locked = os.path.join(root, "unwritable")
        os.makedirs(locked, exist_ok=True)
        os.chmod(locked, 0o500)
        self.paths["unwritable"] = os.path.join(locked, "inside")

    def any(self, rng: random.Random) -> str:
        return rng.choice(sorted(self.paths.values()))

    def fresh_output(self, rng: random.Random) -> str:
        return os.path.join(self.root, f"out-{rng.randrange(10**9)}")


def _numbers(kind, meta, rng: random.Random):
    edges = [0, 1, -1, 2, 3, 7, 10**9]
    for bound in ("at_least", "above", "below"):
        if meta.get(bound) is not None:
            b = meta[bound]
            edges += [b - 1, b, b + 1] if kind is int else [b, b - 1e-9, b + 1e-9, b * 2]
    if kind is float:
        edges += [0.5, 1e-8, 1e9, math.nan, math.inf, -math.inf]
    value = rng.choice(edges)
    return int(value) if kind is int else value


def value_for(owner, field, rng: random.Random, fixtures: Fixtures) -> List[str]:
    """The words after the flag for one fuzzed value of `field` ([] for a bare switch)."""
    from spannorm_megatron.config.options import _choices

    meta = field.metadata
    kind, _optional = _kind(owner, field)
    if field.name in SIZES:
        return [str(rng.choice(SIZES[field.name]))]
    writes = (meta.get("path") or "").startswith("output")  # config/paths.py's kinds
    if meta.get("path") and not writes or (kind is str and "path" in field.name):
        return [fixtures.any(rng)]
    if writes:
        return [rng.choice([fixtures.fresh_output(rng), fixtures.any(rng)])]
    choices = _choices(meta)
    if choices:
        return [str(rng.choice(list(choices) + ["bogus"]))]
    if typing_is_list(kind) or meta.get("nargs") not in (None, "?"):
        element = typing_element(kind)
        count = rng.choice([0, 1, 2, 3])
        return [str(_numbers(element, meta, rng)) if element in (int, float)
                else rng.choice(["a", "1", "-"]) for _ in range(count)]
    if kind in (int, float):
        return [str(_numbers(kind, meta, rng)) if rng.random() > 0.05 else "words"]
    return [rng.choice(["", "x", "1", "none", "-1", "a" * 300])]


def typing_is_list(kind) -> bool:
    import typing

    return typing.get_origin(kind) in (list, typing.List)


def typing_element(kind):
    import typing

    args = typing.get_args(kind)
    return args[0] if args else str


def _single(rng, fixtures, flags) -> List[str]:
    owner, field = rng.choice(flags)
    kind, _ = _kind(owner, field)
    flag = _flag(field)
    if kind is bool:
        default = field.default if field.default is not dataclasses.MISSING else False
        on = rng.random() < 0.8
        negative = field.metadata.get("negative")
        # A switch's flag turns its default over (a negative flag turns a True field off).
        return [flag] if on else [flag.replace("--", "--no-", 1)] if not negative or default \
            else [flag]
    return [flag, *value_for(owner, field, rng, fixtures)]


def _parallel(rng) -> List[str]:
    tp, pp, ep = rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([1, 2])
    argv = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--expert-model-parallel-size", str(ep),
            "--num-layers", str(rng.choice([1, 2, 4, 6])),
            "--micro-batch-size", str(rng.choice([1, 2])),
            "--global-batch-size", str(rng.choice([1, 2, 4, 6]))]
    roll = rng.random()
    if roll < 0.25:
        argv += ["--num-virtual-stages-per-pipeline-rank", str(rng.choice([1, 2, 3]))]
    elif roll < 0.45:
        argv += ["--num-layers-per-virtual-pipeline-stage", str(rng.choice([1, 2]))]
    elif roll < 0.65:
        argv += ["--pipeline-model-parallel-layout",
                 rng.choice(["Et|tL", "Ettt|tL", "E|t*2|L", "t|t", "Ett|", "E(tt|)*2L", "x"])]
    if rng.random() < 0.3:
        argv += ["--sequence-parallel"]
    if rng.random() < 0.2:
        argv += ["--context-parallel-size", str(rng.choice([1, 2]))]
    return argv


def _moe(rng) -> List[str]:
    argv = ["--num-experts", str(rng.choice([2, 4, 3])), "--moe-router-topk",
            str(rng.choice([1, 2, 3])),
            "--moe-router-load-balancing-type",
            rng.choice(["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"]),
            "--moe-token-dispatcher-type", rng.choice(["alltoall", "allgather"])]
    if rng.random() < 0.4:
        argv += ["--moe-expert-capacity-factor", str(rng.choice([0.5, 1.0, 1.25, -1.0])),
                 *(["--moe-pad-expert-input-to-capacity"] if rng.random() < 0.5 else []),
                 "--moe-token-drop-policy", rng.choice(["probs", "position"])]
    if rng.random() < 0.4:
        argv += ["--moe-router-score-function", rng.choice(["softmax", "sigmoid"]),
                 *(["--moe-router-enable-expert-bias"] if rng.random() < 0.5 else [])]
    if rng.random() < 0.3:
        argv += ["--moe-router-num-groups", str(rng.choice([1, 2])),
                 "--moe-router-group-topk", str(rng.choice([1, 2]))]
    if rng.random() < 0.3:
        argv += ["--moe-layer-freq", rng.choice(["1", "2", "[0,1]", "[1]", "([0]*1+[1]*1)"])]
    if rng.random() < 0.3:
        argv += ["--moe-z-loss-coeff", str(rng.choice([0.0, 1e-3]))]
    return argv


def _sequence(rng) -> List[str]:
    seq = rng.choice([8, 16, 32, 48])
    return ["--seq-length", str(seq), "--max-position-embeddings",
            str(rng.choice([seq, seq - 1, seq * 2])),
            "--position-embedding-type", rng.choice(["rope", "learned_absolute", "none"])]


def _schedule(rng) -> List[str]:
    argv = ["--lr-decay-style", rng.choice(["constant", "linear", "cosine",
                                            "inverse-square-root", "WSD"]),
            "--lr-warmup-iters", str(rng.choice([0, 1, 5])),
            "--train-iters", str(rng.choice([1, 2]))]
    if rng.random() < 0.3:
        argv += ["--lr-decay-iters", str(rng.choice([0, 1, 10]))]
    if rng.random() < 0.3:
        argv += ["--min-lr", str(rng.choice([0.0, 1e-4, 1.0]))]
    if rng.random() < 0.2:
        argv += ["--lr-wsd-decay-iters", str(rng.choice([1, 5])),
                 "--lr-wsd-decay-style", rng.choice(["linear", "cosine", "exponential"])]
    return argv


COMBINATIONS = (_parallel, _moe, _sequence, _schedule)


@dataclasses.dataclass
class Example:
    seed: int
    argv: List[str]
    env: dict


def generate(seed: int, fixtures: Fixtures, flags=None) -> Example:
    """The example of `seed`: BASE with one to three changes (the same seed, the same one)."""
    rng = random.Random(seed)
    flags = flags or declared_flags()
    argv = list(BASE)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if rng.random() < 0.35:
            argv += rng.choice(COMBINATIONS)(rng)
        else:
            argv += _single(rng, fixtures, flags)
    env = {}
    if rng.random() < 0.1:
        name = rng.choice(sorted(ENVIRONMENT))
        env[name] = rng.choice(ENVIRONMENT[name])
    return Example(seed, argv, env)


@dataclasses.dataclass
class Outcome:
    status: Optional[int]
    output: str
    defect: Optional[str]


# megatron-core writes the attention backend into these for every model it builds: an example
# run in this process must not hand them to the next one.
_WRITTEN_BY_MEGATRON = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextlib.contextmanager
def _environment(values: dict):
    saved = {name: os.environ.get(name) for name in (*values, *_WRITTEN_BY_MEGATRON)}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_example(example: Example) -> Outcome:
    """Run the example and classify how it ended: in this process, or in a fresh one when it
    sets environment variables (some are read once per process, e.g. strict device mode's)."""
    if example.env:
        return _run_in_subprocess(example)
    from spannorm_megatron.train import main

    captured = io.StringIO()
    try:
        with _environment(example.env), contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured):
            status = main(example.argv)
    except BaseException:  # noqa: BLE001 - what escapes main is the defect
        return Outcome(None, captured.getvalue(), traceback.format_exc())
    finally:
        _tear_down()
    return Outcome(status, captured.getvalue(), check_example(status, captured.getvalue()))


def _run_in_subprocess(example: Example) -> Outcome:
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-m", "spannorm_megatron.train", *example.argv],
            capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE),
            env={**os.environ, "PYTHONPATH": os.path.dirname(HERE), **example.env})
    except subprocess.TimeoutExpired as expired:
        return Outcome(None, str(expired.output or ""), "a hang (no end within 300 s)")
    output = done.stdout + done.stderr
    return Outcome(done.returncode, output, check_example(done.returncode, output))


def check_example(status: int, output: str) -> Optional[str]:
    """None when the example ended as it should (see the module docstring), else why not."""
    if "Traceback (most recent call last)" in output:
        return "a traceback"
    if status == 0:
        return None if "iteration" in output else "exit 0 without a training step"
    if status in (1, 2):
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        return None if len(errors) == 1 else f"exit {status} with {len(errors)} error lines"
    return f"exit status {status}"


def _tear_down() -> None:
    """What a crashed example may have left for the next one (a clean run tears down itself)."""
    import torch

    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fuzz(seeds, fixtures: Fixtures, deadline: Optional[float] = None, log=print):
    """Run the examples of `seeds` (until `deadline`); the defective ones."""
    flags = declared_flags()
    defects, counts = [], {"accepted": 0, "refused": 0, "failed cleanly": 0}
    for seed in seeds:
        if deadline is not None and time.monotonic() > deadline:
            break
        example = generate(seed, fixtures, flags)
        outcome = run_example(example)
        if outcome.defect:
            defects.append((example, outcome))
            log(f"seed {seed}: DEFECT ({outcome.defect}): {' '.join(example.argv[len(BASE):])} "
                f"{example.env or ''}")
        else:
            counts[{0: "accepted", 2: "refused"}.get(outcome.status, "failed cleanly")] += 1
    log(f"fuzz: {counts}, {len(defects)} defect(s)")
    return defects, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz spannorm-train's inputs (see the module "
                                     "docstring).")
    parser.add_argument("--seed", type=int, default=0, help="first example's seed")
    parser.add_argument("--examples", type=int, default=None, help="how many (default: until "
                        "--minutes are up)")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget")
    parser.add_argument("--work-dir", default="/tmp/spannorm_fuzz", help="fixtures and outputs")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fixtures = Fixtures(args.work_dir)
    seeds = (range(args.seed, args.seed + args.examples) if args.examples
             else itertools.count(args.seed))
    defects, _ = fuzz(seeds, fixtures, time.monotonic() + 60 * args.minutes)
    for example, outcome in defects:
        print(f"\n=== seed {example.seed}: {outcome.defect}\n{' '.join(example.argv)}\n"
              f"{example.env}\n{outcome.output[-3000:]}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
