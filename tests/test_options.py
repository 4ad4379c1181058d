"""Each configuration field is declared once (spannorm_megatron.config.options): the flags, the YAML
keys, `--help` and the checks all come from the declarations. The bad values fed here are
derived from each field's declared type and range, so a new flag is covered without editing
this file."""

import dataclasses

import pytest

from _path_kinds import make_good
from spannorm_megatron.cli import run_cli
from spannorm_megatron.config.options import _base_type, declared, flag_of, invalid_values, options
from spannorm_megatron.errors import UserError
from spannorm_megatron.train import main as train_main
from spannorm_megatron.training.arguments import SECTIONS, build_parser, parse_args

NOT_FIELDS = {"help", "config"}  # argparse's own, and the file of flags itself

# What Megatron-LM (and so spannorm-train) cannot run without.
REQUIRED = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
            "--lr", "1e-3", "--train-iters", "100", "--tokenizer-type", "SentencePieceTokenizer"]


def _declared_flags():
    return [(owner, field) for _, owner in SECTIONS for field in options(owner)]


def test_every_flag_is_a_field_and_every_field_a_flag():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest not in NOT_FIELDS}
    fields = {field.name: (owner, field) for owner, field in _declared_flags()}
    assert len(fields) == len(_declared_flags()), "two sections declare the same field"
    assert set(flags) == set(fields)
    for name, (owner, field) in fields.items():
        assert flag_of(field) in flags[name].option_strings
        assert field.metadata["doc"] in flags[name].help
    # The fields without a flag of their own say where their value comes from.
    for _, owner in SECTIONS:
        for field in declared(owner):
            if field not in options(owner):
                assert field.metadata["derived_from"], field.name


def test_defaults_of_the_parser_are_the_dataclass_defaults():
    flags = parse_args(REQUIRED).flags
    given = {flag for flag in REQUIRED if flag.startswith("--")}
    for _, owner in SECTIONS:
        instance = owner(**_required(owner))
        for field in options(owner):
            if field.metadata["fallback"] is None and field.name not in _required(owner) \
                    and flag_of(field) not in given:
                assert flags[field.name] == getattr(instance, field.name), field.name


def test_megatron_lm_required_flags_are_required_and_named_together(capsys):
    assert train_main([]) == 2
    err = capsys.readouterr().err
    for flag in REQUIRED[::2]:
        assert flag in err, flag
    assert "--train-iters or --train-samples" in err and "Traceback" not in err
    for i in range(0, len(REQUIRED), 2):  # each one alone is missed
        if REQUIRED[i] == "--train-iters":
            continue
        with pytest.raises(UserError, match=f"required .*{REQUIRED[i]}"):
            parse_args(REQUIRED[:i] + REQUIRED[i + 2:])
    with pytest.raises(UserError, match="exactly one of them"):
        parse_args(REQUIRED + ["--train-samples", "800"])


def test_switches_lists_and_aliases_take_megatron_lm_spellings(tmp_path):
    model = parse_args(REQUIRED).model
    assert model.add_bias_linear and not model.swiglu
    assert not model.untie_embeddings_and_output_weights
    job = parse_args([*REQUIRED, "--disable-bias-linear", "--swiglu",
                      "--moe-router-load-balancing-type", "seq_aux_loss", "global_aux_loss",
                      "--moe-aux-loss-coeff", "1e-3", "1e-4",
                      "--virtual-pipeline-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "1"])
    model = job.model
    assert not model.add_bias_linear and model.swiglu
    assert model.moe_router_load_balancing_type == ["seq_aux_loss", "global_aux_loss"]
    assert model.moe_aux_loss_coeff == [1e-3, 1e-4]
    # the older spelling, kept as alias
    assert job.parallel.virtual_pipeline_model_parallel_size == 2
    # In YAML the negative flag's key means what the flag means; the field's name means itself.
    config = tmp_path / "run.yaml"
    config.write_text("disable-bias-linear: true\nmoe-aux-loss-coeff: [0.1, 0.2]\n"
                      "moe-router-load-balancing-type: [aux_loss, seq_aux_loss]\n")
    model = parse_args(["--config", str(config), *REQUIRED]).model
    assert model.add_bias_linear is False and model.moe_aux_loss_coeff == [0.1, 0.2]
    config.write_text("add_bias_linear: false\n")
    assert parse_args(["--config", str(config), *REQUIRED]).model.add_bias_linear is False
    # Every switch can be undone on the command line, over a --config key.
    config.write_text("swiglu: true\n")
    assert parse_args(["--config", str(config), *REQUIRED, "--no-swiglu"]).model.swiglu is False
    # A key given twice is refused (PyYAML would keep the last one without a word).
    config.write_text("lr: 1.0e-3\nswiglu: true\nlr: 3.0e-4\n")
    with pytest.raises(UserError, match=r"--config .*run\.yaml is not valid YAML: key 'lr' "
                       r"appears twice \(lines 1 and 3\)"):
        parse_args(["--config", str(config), *REQUIRED])


CASES = [(owner, field, value) for owner, field in _declared_flags()
         for value in invalid_values(owner, field)]


def test_every_numeric_and_choice_flag_has_bad_values():
    covered = {field.name for _, field, _ in CASES}
    for owner, field in _declared_flags():
        kind, _ = _base_type(field, owner)
        if kind in (int, float) or field.metadata["choices"] or field.metadata["parse"]:
            assert field.name in covered, field.name


@pytest.mark.parametrize("owner,field,value", CASES,
                         ids=[f"{flag_of(f)}={v}" for _, f, v in CASES])
def test_bad_flag_value_exits_2_naming_the_flag_before_anything_runs(owner, field, value, capsys):
    status = train_main([flag_of(field), value])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"argument {flag_of(field)}" in err
    assert err.count("error: ") == 1 and "Traceback" not in err


@pytest.mark.parametrize("owner,field,value", CASES[::3],
                         ids=[f"{flag_of(f)}={v}" for _, f, v in CASES[::3]])
def test_bad_yaml_value_is_refused_naming_the_key(owner, field, value, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"{flag_of(field)[2:]}: {value}\n")
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{flag_of(field)[2:]}: " in err and "Traceback" not in err


@pytest.mark.parametrize("owner,field,value", [c for c in CASES if c[2] not in
                                                ("not-a-number", "no-such-value", "1.5")])
def test_the_dataclass_refuses_what_the_flag_refuses(owner, field, value):
    """Python users get the same range checks as the command line."""
    number = {"nan": float("nan")}.get(value)
    if number is None:
        try:
            number = int(value)
        except ValueError:
            number = float(value) if value[0].isdigit() or value[0] == "-" else value
    with pytest.raises(UserError, match=field.name):
        owner(**{**_required(owner), field.name: number})


def _without(*flags):
    """REQUIRED less `flags` (and their values)."""
    pairs = zip(REQUIRED[::2], REQUIRED[1::2])
    return [item for flag, value in pairs if flag not in flags for item in (flag, value)]


def _required(owner):
    return {"DataConfig": {"data_path": "prefix"},
            "TrainingConfig": {"train_iters": 100, "lr": 1e-3}}.get(owner.__name__, {})


def test_unknown_yaml_key_and_flag_name_the_nearest(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("num-layrs: 4\n")
    assert train_main(["--config", str(config)]) == 2
    assert "did you mean 'num-layers'" in capsys.readouterr().err
    assert train_main(["--hiden-size", "8"]) == 2
    assert "--hiden-size -> --hidden-size?" in capsys.readouterr().err
    # No abbreviations: Megatron-LM refuses them too, and a prefix could silently change meaning.
    assert train_main(["--hidden", "8"]) == 2


def test_yaml_keys_are_flags_in_either_spelling_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        make_good("data_prefix", tmp_path / name)
    config = tmp_path / "run.yaml"
    config.write_text("num_layers: 6\nmax-position-embeddings: 64\nlr: 0.002\nswiglu: false\n"
                      "data-path: [a, b]\n")
    job = parse_args(["--config", str(config), *_without("--num-layers", "--lr",
                                                         "--max-position-embeddings"),
                      "--lr", "0.001"])
    assert (job.model.num_layers, job.model.max_sequence_length, job.training.lr,
            job.model.swiglu, job.data.data_path) == (6, 64, 0.001, False, ["a", "b"])
    # A path in the file is checked for its kind as on the command line.
    config.write_text("data-path: [a, missing]\n")
    with pytest.raises(UserError, match=r"run.yaml: data-path: Data prefix 'missing' not found"):
        parse_args(["--config", str(config), *REQUIRED])


def test_cross_field_checks_run_at_parse_time():
    for argv, fragment in ((["--lr-warmup-iters", "100"], "--lr-warmup-iters 100"),
                           (["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 is above"),
                           (["--recompute-method", "block"], "--recompute-method applies"),
                           (["--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters N"),
                           (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "200"],
                            "at most --lr-decay-iters = 100"),
                           (["--lr-warmup-samples", "8"], "cannot be used with --train-iters"),
                           (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"],
                            "both set the warm-up"),
                           (["--max-position-embeddings", "32"], "smaller than --seq-length"),
                           (["--position-embedding-type", "mrope"], "not available here"),
                           (["--moe-router-load-balancing-type", "aux_loss", "z_loss"],
                            "is not one of"),
                           (["--num-experts", "4", "--moe-router-load-balancing-type",
                             "aux_loss", "seq_aux_loss"], "one coefficient for each")):
        with pytest.raises(UserError, match=fragment):
            parse_args([*REQUIRED, *argv])
    assert run_cli(parse_args, [*REQUIRED, "--lr", "inf"]) == 2


def test_a_new_field_becomes_a_checked_flag():
    """What adding a field takes: one declaration."""
    from spannorm_megatron.config.options import add_arguments, check, from_namespace, option
    import argparse

    @dataclasses.dataclass
    class Toy:
        width: int = option(8, "A toy width.", at_least=2)
        mode: str = option("a", "A toy mode.", choices=("a", "b"))

        def __post_init__(self):
            check(self)

    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    assert from_namespace(Toy, parser.parse_args(["--width", "4", "--mode", "b"])) == Toy(4, "b")
    assert sorted(v for f in options(Toy) for v in invalid_values(Toy, f)) == \
        sorted(["not-a-number", "1.5", "1", "no-such-choice"])
    with pytest.raises(UserError, match=r"--width \(width\) = 1 must be >= 2"):
        Toy(width=1)


def test_paths_are_checked_for_what_they_must_be_before_anything_runs(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    for argv, fragment in (
            (["--save", str(a_file)], f"--save: '{a_file}' is a file, not a directory"),
            (["--tensorboard-dir", str(a_file / "tb")], f"cannot be created: {a_file} is a file"),
            (["--data-cache-path", str(a_file)], "is a file"),
            (["--tokenizer-model", str(tmp_path)], "is a directory"),
            (["--tokenizer-model", str(tmp_path / "none.model")], "does not exist"),
            (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(a_file),
              "--merge-file", str(tmp_path / "none.txt")], "none.txt' does not exist"),
            (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)],
             "is a directory without a Hugging Face tokenizer")):
        assert train_main([*REQUIRED, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
    # A writable output is probed with a real file, which is gone afterwards.
    parse_args([*REQUIRED, "--save", str(tmp_path / "new" / "ckpt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert a_file.read_text() == "kept"


def test_every_seed_takes_32_bits_and_every_integer_flag_64_in_every_entry_point():
    """numpy and SentencePiece take 32-bit seeds and torch 64-bit integers: a larger value is
    the flag's refusal, not a library's traceback, whichever command takes it."""
    import argparse

    from test_paths import _parser, entry_points

    seeds = integers = 0
    for module in entry_points():
        for action in _parser(module)._actions:
            if getattr(action.type, "__name__", "") != "int" \
                    or not hasattr(action.type, "path_kind"):  # not a declared option()
                continue
            integers += 1
            with pytest.raises(argparse.ArgumentTypeError, match="64 bits|must be <|is not one of"):
                action.type(str(2 ** 63))
            if action.dest == "seed":
                seeds += 1
                assert action.type(str(2 ** 32 - 1)) == 2 ** 32 - 1
                with pytest.raises(argparse.ArgumentTypeError, match="must be < 4294967296"):
                    action.type(str(2 ** 32))
    assert seeds >= 4 and integers >= 100


COUNTS = {  # flag -> a value below its range, refused when the tools' flags are parsed
    "spannorm_megatron.benchmarks.training": (
        ("--iters", "0"), ("--rounds", "0"), ("--warmup", "-1"), ("--seq-length", "0"),
        ("--micro-batch-size", "0"), ("--expert-model-parallel-size", "0")),
    "spannorm_megatron.benchmarks.moe": (
        ("--iters", "0"), ("--rounds", "0"), ("--warmup", "-1"), ("--seq-length", "0"),
        ("--micro-batch-size", "0"), ("--expert-model-parallel-size", "0")),
    "spannorm_megatron.hf.importer_cli": (
        ("--iteration", "-1"), ("--tensor-model-parallel-size", "0"),
        ("--pipeline-model-parallel-size", "0"), ("--expert-model-parallel-size", "0")),
}


@pytest.mark.parametrize("module", sorted(COUNTS))
def test_tool_counts_are_refused_at_parse_time_below_their_range(module):
    """Not after the models were built (`benchmark --iters 0`: statistics' traceback), nor
    naming a Python parameter (`convert_from_hf --iteration -1`: 'iteration=-1')."""
    import argparse

    from test_paths import _parser

    actions = {a.option_strings[0]: a for a in _parser(module)._actions if a.option_strings}
    for flag, bad in COUNTS[module]:
        with pytest.raises(argparse.ArgumentTypeError, match="must be >="):
            actions[flag].type(bad)
