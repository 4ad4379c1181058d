"""A seeded fuzzer of `spannorm-train`'s inputs, generated from the declared fields.

Every example is a command line: a tiny valid run (mock data, NullTokenizer, one iteration)
with a few of its flags changed. The changes come from the declarations themselves
(`options()`: type, choices, bounds, path kind), so a new flag is fuzzed without being listed:

- single values: each kind's edge cases (bounds and one past them, zero, negatives, non-finite
  numbers, unknown choices, empty and long lists, words where numbers go);
- cross-field combinations: parallel sizes x layers x virtual stages x layouts x micro-batches,
  MoE routing x balancing x capacity, sequence x positions, schedules, data files x blends x
  splits x evaluation, a checkpoint to resume x what the resume changes;
- path flags: file fixtures (missing, empty, binary, a folder where a file is expected, a file
  where a folder is expected, unwritable), and each path kind's own (`Fixtures`): truncated and
  stale datasets, checkpoints with a garbage or stale tracker or half written, a tokenizer model
  cut short, and good ones (a dataset, a real checkpoint);
- environment variables: every declared one (config/environment.py) with its kind's edge
  values, those read as free text, and torchrun's launch variables together.

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
import functools
import io
import itertools
import json
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

# Sizes whose large values would only measure the machine's speed: fuzzed among small ones, and
# each size the Trainer's memory floors cover (the model's training state, the datasets'
# indexes) also with a value no machine here holds (HUGE), which they must refuse up front.
HUGE = 10**9
SIZES = {"num_layers": [0, 1, 3, 4, 6, HUGE], "hidden_size": [0, 8, 30, 48, 64, HUGE],
         "num_attention_heads": [0, 1, 3, 8], "ffn_hidden_size": [0, 1, 64, 100, HUGE],
         "seq_length": [0, 1, 16, 31, 64], "max_sequence_length": [1, 16, 31, 64, 4096, HUGE],
         "micro_batch_size": [0, 1, 3, 4], "global_batch_size": [0, 1, 3, 4, 8],
         "num_experts": [0, 1, 2, 3, 4, HUGE], "vocab_size": [0, 1, 100, 256, HUGE],
         "kv_channels": [0, 4, 7, 16, HUGE], "num_query_groups": [0, 1, 2, 3, 4],
         "moe_ffn_hidden_size": [0, 16, 33, HUGE], "moe_router_topk": [0, 1, 2, 5],
         "train_iters": [0, 1, 2], "eval_iters": [0, 1, 2, 10 * HUGE], "log_interval": [0, 1, 2],
         "moe_shared_expert_intermediate_size": [0, 16, 33, HUGE],
         "num_workers": [0, 1, 2, HUGE]}
# Flags whose values name things outside this process, or stop it, set apart from the rest.
NOT_FUZZED = {"config", "exit_duration_in_mins", "exit_interval", "exit_signal_handler"}
"""(--config gets its own files, `_config`.)"""

# Each declared environment variable's kind (config/environment.py) gets its edge values.
KIND_VALUES = {"count": ["0", "1", "2", "-1", "x", " 3 ", "1e3"],
               "switch": ["1", "0", "yes", "OFF", "maybe", " "],
               "bit": ["0", "1", "2", "x"], "port": ["0", "1", "29500", "65536", "x"],
               "tflops": ["989", "0", "-1", "inf", "nan", "x"]}
# Read by the package but taken as free text (tests/test_paths.py's FREE_TEXT), fuzzed too.
UNDECLARED = {"OMP_NUM_THREADS": ["1", "0", "-3", "many"], "MASTER_ADDR": ["127.0.0.1", ""],
              "TORCHELASTIC_RUN_ID": ["fuzz"]}


def environment_values(fixtures: "Fixtures") -> dict:
    """name -> the values an example may set it to, from the declarations."""
    from spannorm_megatron.config.environment import ENVIRONMENT

    values = {name: (KIND_VALUES[variable.kind] if variable.kind in KIND_VALUES
                     else [fixtures.fresh_output(random.Random(0)), *sorted(fixtures.paths.values())])
              for name, variable in ENVIRONMENT.items()}
    return {**values, **UNDECLARED}


def _launch_environment(rng: random.Random) -> dict:
    """torchrun's variables together, as a shell or a half-copied job script leaves them. Never
    MASTER_ADDR and MASTER_PORT with a world of several ranks: a run then rightly waits for the
    other ranks (a manual launch), which no check can tell from a mistake."""
    world = rng.choice([1, 2, 4])
    env = {"WORLD_SIZE": str(world), "RANK": str(rng.choice([0, 1, world])),
           "LOCAL_RANK": str(rng.choice([0, 1])),
           "LOCAL_WORLD_SIZE": str(rng.choice([1, world, world + 1]))}
    if rng.random() < 0.5:
        env[rng.choice(["MASTER_ADDR", "MASTER_PORT"])] = rng.choice(["127.0.0.1", "39517"])
    if world == 1 and rng.random() < 0.5:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(rng.choice([39517, 0, 70000])))
    return env


@functools.lru_cache(maxsize=None)
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
    """Files and folders of every shape a path flag may be given: generic ones (missing, empty,
    binary, text, a folder, a path below a file, an unwritable folder) for every path flag, and
    for each path kind things that look like what it reads but are broken (`KIND_FIXTURES`):
    a data prefix with a truncated .idx or .bin, or a .bin and .idx of two different datasets
    (stale); checkpoints whose tracker holds garbage or names an iteration that is not there, or
    whose iteration folder is empty (half written); a SentencePiece model cut short. Good ones
    too, so that examples get past the path checks: a dataset, and a real checkpoint of BASE
    (written here by one run; a run that loads it trains on from iteration 1)."""

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
        os.chmod(locked, 0o500)  # root writes there anyway: "below_a_file" is unwritable to all
        self.paths["unwritable"] = os.path.join(locked, "inside")
        self.paths["below_a_file"] = os.path.join(self.paths["text"], "inside")
        self.kinds = {"data_prefix": self._data_prefixes(), "tokenizer_model": self._models()}
        self.kinds["checkpoint"] = self.kinds["resume_checkpoint"] = self._checkpoints()

    def named(self) -> dict:
        """Every fixture by name (a kind's under `kind:name`), as `expand` reads them."""
        return {**self.paths, **{f"{kind}:{name}": path for kind, paths in self.kinds.items()
                                 for name, path in paths.items()}}

    def any(self, rng: random.Random) -> str:
        return rng.choice(sorted(self.paths.values()))

    def of_kind(self, kind: Optional[str], rng: random.Random) -> str:
        """A path for a flag of path `kind`: one of its own fixtures or a generic one."""
        own = self.kinds.get(kind or "")
        if own and rng.random() < 0.6:
            return own[rng.choice(sorted(own))]
        return self.any(rng)

    def fresh_output(self, rng: random.Random) -> str:
        return os.path.join(self.root, f"out-{rng.randrange(10**9)}")

    # ---------------------------------------------------------------- a kind's own fixtures
    def _data_prefixes(self) -> dict:
        import numpy as np
        import torch
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        def build(name, documents, high):
            prefix = os.path.join(self.root, name)
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            generator = np.random.default_rng(len(name))
            for _ in range(documents):
                length = int(generator.integers(20, 90))
                builder.add_document(torch.from_numpy(
                    generator.integers(1, high, size=length).astype(np.int64)), [length])
            builder.finalize(prefix + ".idx")
            return prefix

        good, other = build("data_good", 200, 120), build("data_other", 40, 120)
        wide = build("data_wide_ids", 50, 60000)  # ids beyond BASE's vocabulary of 128
        prefixes = {"good": good, "other": other, "wide_ids": wide}
        for name, cut in (("idx_truncated", ".idx"), ("bin_truncated", ".bin")):
            prefix = os.path.join(self.root, "data_" + name)
            for suffix in (".bin", ".idx"):
                with open(good + suffix, "rb") as f:
                    content = f.read()
                with open(prefix + suffix, "wb") as f:
                    f.write(content[:len(content) // 2] if suffix == cut else content)
            prefixes[name] = prefix
        stale = os.path.join(self.root, "data_stale")  # another dataset's .bin beside the .idx
        for suffix, source in ((".idx", good), (".bin", other)):
            with open(source + suffix, "rb") as f, open(stale + suffix, "wb") as out:
                out.write(f.read())
        prefixes["stale"] = stale
        return prefixes

    def _models(self) -> dict:
        cut = os.path.join(self.root, "cut_short.model")
        with open(cut, "wb") as f:
            f.write(b"\n\x0f\n\x05<unk>\x15\x00\x00")  # a SentencePiece proto cut short
        return {"cut_short": cut}

    def _checkpoints(self) -> dict:
        from spannorm_megatron.config.paths import TRACKER_FILENAME

        def folder(name, tracker=None, iterations=()):
            path = os.path.join(self.root, "checkpoint_" + name)
            os.makedirs(path, exist_ok=True)
            for iteration in iterations:
                os.makedirs(os.path.join(path, f"iter_{iteration:07d}"), exist_ok=True)
            if tracker is not None:
                with open(os.path.join(path, TRACKER_FILENAME), "w") as f:
                    f.write(tracker)
            return path

        self.real_checkpoint = os.path.join(self.root, "checkpoint_real")  # see `prepare`
        return {"real": self.real_checkpoint, "tracker_garbage": folder("tracker_garbage", "twelve"),
                "tracker_stale": folder("tracker_stale", "7", iterations=[1]),
                "half_written": folder("half_written", "1", iterations=[1]),
                "no_tracker_empty_iteration": folder("no_tracker", None, iterations=[3])}


    def prepare(self, argv: List[str]) -> None:
        """Write the real checkpoint if `argv` names it and it is not there yet (one run of
        BASE, a second or two: only runs that need it pay for it)."""
        if self.real_checkpoint in argv and not os.path.isdir(
                os.path.join(self.real_checkpoint, "iter_0000001")):
            outcome = run_example(Example(0, [*BASE, "--save", self.real_checkpoint], {}))
            assert outcome.status == 0 and not outcome.defect, outcome.output[-3000:]


def expand(words: List[str], fixtures: Fixtures) -> List[str]:
    """`words` with each `{name}` replaced by that fixture's path (see `Fixtures.named`)."""
    named = fixtures.named()
    return [named[word[1:-1]] if word.startswith("{") and word.endswith("}") else word
            for word in words]


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
        return [fixtures.of_kind(meta.get("path"), rng)]
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


def _parallel(rng, fixtures) -> List[str]:
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


def _moe(rng, fixtures) -> List[str]:
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


def _sequence(rng, fixtures) -> List[str]:
    seq = rng.choice([8, 16, 32, 48])
    return ["--seq-length", str(seq), "--max-position-embeddings",
            str(rng.choice([seq, seq - 1, seq * 2])),
            "--position-embedding-type", rng.choice(["rope", "learned_absolute", "none"])]


def _schedule(rng, fixtures) -> List[str]:
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


def _data(rng, fixtures) -> List[str]:
    """Files instead of mock data: blends x splits x evaluation, or one blend per split."""
    prefixes = fixtures.kinds["data_prefix"]
    good = prefixes["good"]

    def blend():
        chosen = [rng.choice([good, good, prefixes["other"], fixtures.of_kind("data_prefix", rng)])
                  for _ in range(rng.choice([1, 1, 2]))]
        if len(chosen) == 1 and rng.random() < 0.7:
            return chosen
        return [word for prefix in chosen
                for word in (str(rng.choice([0.3, 1, 0, -1, "w"])), prefix)]

    argv = ["--no-mock-data"]
    if rng.random() < 0.7:
        argv += ["--data-path", *blend()]
        if rng.random() < 0.7:
            argv += ["--split", rng.choice(["98,2,0", "100,0,0", "1,1,1", "0,0,100", "90,10",
                                            "a,b", "0,0,0", "50,-1,51"])]
    else:
        for flag in ("--train-data-path", "--valid-data-path", "--test-data-path"):
            if rng.random() < 0.7:
                argv += [flag, *blend()]
    if rng.random() < 0.5:
        argv += ["--eval-iters", str(rng.choice([0, 1, 3])),
                 "--eval-interval", str(rng.choice([1, 2, 1000]))]
    if rng.random() < 0.3:
        argv += ["--data-cache-path", rng.choice([fixtures.fresh_output(rng),
                                                  fixtures.any(rng)])]
    if rng.random() < 0.3:
        argv += [rng.choice(["--reset-position-ids", "--eod-mask-loss", "--no-mmap-bin-files"])]
    return argv


def _resume(rng, fixtures) -> List[str]:
    """A checkpoint to go on from (real, or broken as `Fixtures` makes them) x what a resume
    may change: the steps, what is loaded, where it saves, the model's flags taken from it."""
    checkpoints = fixtures.kinds["checkpoint"]
    argv = ["--load", checkpoints[rng.choice(["real", "real", "real", *sorted(checkpoints)])],
            "--train-iters", str(rng.choice([1, 2, 3]))]
    for flag in ("--no-load-optim", "--no-load-rng", "--use-checkpoint-args",
                 "--use-mp-args-from-checkpoint-args", "--load-fallback",
                 "--no-use-tokenizer-model-from-checkpoint-args"):
        if rng.random() < 0.25:
            argv.append(flag)
    if rng.random() < 0.5:
        argv += ["--save", fixtures.fresh_output(rng),
                 "--save-interval", str(rng.choice([1, 2, 5]))]
    if rng.random() < 0.3:  # a change the checkpoint may contradict
        argv += rng.choice([["--hidden-size", "64"], ["--num-layers", "3"], ["--seq-length", "16"],
                            ["--global-batch-size", "4"], ["--lr", "1e-2"], ["--bf16"],
                            ["--make-vocab-size-divisible-by", "64"]])
    return argv


BROKEN_YAML = ["", "- a list\n- not a mapping\n", "num-layers: [unclosed\n",
               "num-layers: 2\nnum-layers: 3\n", "no-such-key: 1\n", "hidden-size: {a: 1}\n",
               "\tnum-layers: 2\n", "config: other.yaml\n", "lr: .nan\n", "42\n",
               "num_layers: 3\nnum-layers: 3\n"]


def _config(rng, fixtures) -> List[str]:
    """A --config YAML file: fuzzed flags as its keys (values typed as YAML reads them, a
    key given twice now and then), or a file that is broken as a config."""
    path = os.path.join(fixtures.root, f"config-{rng.randrange(10**9)}.yaml")
    if rng.random() < 0.3:
        text = rng.choice(BROKEN_YAML)
    else:
        entries = []
        for _ in range(rng.choice([1, 2, 3])):
            words = _single(rng, fixtures, list(declared_flags()))
            value = True if len(words) == 1 else words[1] if len(words) == 2 else words[1:]
            if isinstance(value, str) and rng.random() < 0.5:
                with contextlib.suppress(ValueError):
                    value = json.loads(value)  # 3 as a number, not the text "3"
            entries.append(f"{words[0][2:]}: {json.dumps(value)}")  # JSON is YAML
        if rng.random() < 0.15:
            entries.append(entries[0])
        text = "\n".join(entries) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return ["--config", path]


COMBINATIONS = (_parallel, _moe, _sequence, _schedule, _data, _resume, _config)


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
            argv += rng.choice(COMBINATIONS)(rng, fixtures)
        else:
            argv += _single(rng, fixtures, flags)
    env = {}
    roll = rng.random()
    if roll < 0.08:
        values = environment_values(fixtures)
        name = rng.choice(sorted(values))
        env[name] = rng.choice(values[name])
    elif roll < 0.12:
        env = _launch_environment(rng)
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


# Read afresh by every run (runtime/launch.py), so an example that sets only these runs in this
# process, seconds faster than in a fresh one.
READ_PER_RUN = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def run_example(example: Example) -> Outcome:
    """Run the example and classify how it ended: in this process, or in a fresh one when it
    sets other environment variables (some are read once per process, e.g. strict device
    mode's)."""
    if not set(example.env) <= READ_PER_RUN:
        return _run_in_subprocess(example)
    from spannorm_megatron.train import main

    captured = io.StringIO()
    try:
        with _environment(example.env), contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured), _deadline(HANG_SECONDS):
            status = main(example.argv)
    except _Hang:
        return Outcome(None, captured.getvalue(), f"a hang (no end within {HANG_SECONDS} s)")
    except BaseException:  # noqa: BLE001 - what escapes main is the defect
        return Outcome(None, captured.getvalue(), traceback.format_exc())
    finally:
        _tear_down()
    return Outcome(status, captured.getvalue(), check_example(status, captured.getvalue()))


HANG_SECONDS = 300
"""An example of BASE's size that has not ended by then never will (one step takes a second)."""


class _Hang(BaseException):
    """Raised into an in-process example at its deadline (not an Exception: what the entry
    point catches must not swallow it)."""


@contextlib.contextmanager
def _deadline(seconds: int):
    import signal

    def expire(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run_in_subprocess(example: Example) -> Outcome:
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-m", "spannorm_megatron.train", *example.argv],
            capture_output=True, text=True, timeout=HANG_SECONDS, cwd=os.path.dirname(HERE),
            env={**os.environ, "PYTHONPATH": os.path.dirname(HERE), **example.env})
    except subprocess.TimeoutExpired as expired:
        return Outcome(None, str(expired.output or ""), f"a hang (no end within {HANG_SECONDS} s)")
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


def fuzz(seeds, fixtures: Fixtures, deadline: Optional[float] = None, log=print,
         progress_every: int = 0):
    """Run the examples of `seeds` (until `deadline`); the defective ones. Every
    `progress_every` examples (0: never) a line says how far it got."""
    flags = declared_flags()
    defects, counts = [], {"accepted": 0, "refused": 0, "failed cleanly": 0}
    for seed in seeds:
        if deadline is not None and time.monotonic() > deadline:
            break
        example = generate(seed, fixtures, flags)
        fixtures.prepare(example.argv)
        outcome = run_example(example)
        if outcome.defect:
            defects.append((example, outcome))
            log(f"seed {seed}: DEFECT ({outcome.defect}): {' '.join(example.argv[len(BASE):])} "
                f"{example.env or ''}")
        else:
            counts[{0: "accepted", 2: "refused"}.get(outcome.status, "failed cleanly")] += 1
        done = sum(counts.values()) + len(defects)
        if progress_every and done % progress_every == 0:
            log(f"progress: {done} examples to seed {seed}, {counts}, {len(defects)} defect(s)")
    log(f"fuzz: {counts}, {len(defects)} defect(s)")
    return defects, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz spannorm-train's inputs (see the module "
                                     "docstring).")
    parser.add_argument("--seed", type=int, default=0, help="first example's seed")
    parser.add_argument("--examples", type=int, default=None, help="how many (default: until "
                        "--minutes are up)")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget")
    parser.add_argument("--progress-every", type=int, default=50, help="a progress line every "
                        "this many examples (0: none)")
    parser.add_argument("--work-dir", default="/tmp/spannorm_fuzz", help="fixtures and outputs")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fixtures = Fixtures(args.work_dir)
    seeds = (range(args.seed, args.seed + args.examples) if args.examples
             else itertools.count(args.seed))
    defects, _ = fuzz(seeds, fixtures, time.monotonic() + 60 * args.minutes,
                      progress_every=args.progress_every)
    for example, outcome in defects:
        print(f"\n=== seed {example.seed}: {outcome.defect}\n{' '.join(example.argv)}\n"
              f"{example.env}\n{outcome.output[-3000:]}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
