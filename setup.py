"""Packaging for spannorm_megatron.

Ranges here admit what GPU clusters run (megatron-core up to 0.19, newer torch); the exact,
tested development pins live in tools/requirements-dev.txt, which tools/setup_env.sh installs.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="spannorm_megatron",
    version="0.1.0",
    description="Megatron-Core training stack for deep Transformers with SpanNorm and other norm placements",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spannorm_megatron", "spannorm_megatron.*"])
    + ["spannorm_megatron.patches"],
    # Upstream fixes live in the top-level patches/ folder (the design card's layout) and are
    # installed as the subpackage spannorm_megatron.patches, so the runtime can apply them.
    package_dir={"spannorm_megatron.patches": "patches"},
    # Megatron-LM's flag names, so that its flags we lack are refused by name.
    package_data={"spannorm_megatron.training": ["megatron_lm_flags.txt"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "packaging",
        "psutil",  # megatron-core dist checkpointing needs it
        "pyyaml",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
    ],
    extras_require={
        # Transformer Engine builds its PyTorch extension against the installed torch and CUDA.
        # The releases megatron-core's dev pin takes (the GPU kit's exact one is in
        # tools/requirements-dev.txt).
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "hf": ["transformers>=4.45", "safetensors>=0.4"],
        "test": ["pytest>=8"],
        "lab": ["matplotlib>=3.7"],
    },
    # Every command is a package module's `main`; tools/*.py are thin entry points to the same.
    entry_points={"console_scripts": [
        "spannorm-train=spannorm_megatron.train:main",
        "spannorm-selfcheck=spannorm_megatron.selfcheck:main",
        "spannorm-train-tokenizer=spannorm_megatron.data.tokenizer_training_cli:main",
        "spannorm-preprocess=spannorm_megatron.data.preprocess_cli:main",
        "spannorm-convert-to-hf=spannorm_megatron.hf.export_cli:main",
        "spannorm-convert-from-hf=spannorm_megatron.hf.importer_cli:main",
        "spannorm-evaluate=spannorm_megatron.evaluation.cli:main",
        "spannorm-generate=spannorm_megatron.hf.generation_cli:main",
        "spannorm-benchmark=spannorm_megatron.benchmarks.training:main",
        "spannorm-benchmark-moe=spannorm_megatron.benchmarks.moe:main",
        "spannorm-benchmark-conversion=spannorm_megatron.benchmarks.conversion:main",
        "spannorm-benchmark-data=spannorm_megatron.benchmarks.data:main",
        "spannorm-signal-propagation=spannorm_megatron.lab.cli:main",
    ]},
)
