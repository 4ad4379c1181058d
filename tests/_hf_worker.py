"""Rank program of tests/test_hf.py, launched once by torchrun on 2 ranks:

    torchrun --standalone --nproc_per_node 2 tests/_hf_worker.py ROOT

1. For every layout in _hf.LAYOUTS and every model of _hf.PARALLEL_COMBOS it applies to: build
   the model under that layout, load ROOT/ref/<combo> (saved single-process by the test) and
   save it again as ROOT/out/<layout>/<combo>, a checkpoint written by two ranks.
2. For every (layout, combos) of _hf.IMPORT_LAYOUTS: convert the exported folder
   ROOT/hf/<combo> into ROOT/out/import-<layout>/<combo> with the converter itself (the first
   TP2 one with the README's command line, tools/convert_from_hf.py under this torchrun).

A failure writes ROOT/out/rank<r>.error (the traceback) and exits non-zero at once.
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import os
import sys

import _hf
from launch import ROOT, reporting


def main(root: str) -> None:
    from spannorm_megatron.checkpoint import load_checkpoint
    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.hf.megatron_reader import local_model_config
    from spannorm_megatron.model import build_model, transformer_config
    from spannorm_megatron.runtime import destroy
    from spannorm_megatron.process import initialize

    dirs = _hf.worker_dirs(root)
    for layout_name, layout in _hf.LAYOUTS.items():
        initialize(layout, seed=1234)
        for combo in _hf.PARALLEL_COMBOS:
            if not _hf.layout_applies(layout_name, combo):
                continue
            config = local_model_config(_hf.model_config(combo))
            chunks = build_model(config, transformer_config(config, **layout.transformer_kwargs()))
            load_checkpoint(os.path.join(dirs["ref"], combo), chunks, None, None,
                            model_config=config, parallel_config=layout, no_load_rng=True)
            _hf.save(chunks, config, os.path.join(dirs["out"], layout_name, combo), layout)
    for layout_name, combos in _hf.IMPORT_LAYOUTS.items():
        layout = _hf.LAYOUTS[layout_name]
        for combo in combos:
            load = os.path.join(dirs["hf"], combo)
            save = os.path.join(dirs["out"], f"import-{layout_name}", combo)
            if layout_name == "tp2" and combo == _hf.PARALLEL_COMBOS[0]:
                _convert_from_hf_command(load, save)  # the README's command, once
                continue
            convert_hf_to_megatron(
                load, save,
                tensor_model_parallel_size=layout.tensor_model_parallel_size,
                pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
                expert_model_parallel_size=layout.expert_model_parallel_size,
                log=lambda line: None)
    destroy()


def _convert_from_hf_command(load: str, save: str) -> None:
    """`torchrun --standalone --nproc_per_node 2 tools/convert_from_hf.py --load HF --save CKPT
    --tensor-model-parallel-size 2`, as the README has it: the tool file run as a script."""
    import contextlib
    import io
    import runpy

    argv = sys.argv
    sys.argv = [str(ROOT / "tools" / "convert_from_hf.py"), "--load", load, "--save", save,
                "--tensor-model-parallel-size", "2"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code != 0:
            raise RuntimeError(f"{' '.join(sys.argv)} exited with {exit_.code}") from None
    finally:
        sys.argv = argv


if __name__ == "__main__":
    with reporting(os.path.join(sys.argv[1], "out")):
        main(sys.argv[1])
