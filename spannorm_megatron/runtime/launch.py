"""What the launcher told this process: torchrun's RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE, read in one place and checked before anything uses them.

Without them the process is a world of one. A value that is not a non-negative integer, or
that contradicts another (a rank outside the world), is refused naming the variable: set by
hand (or left over in a shell), it would otherwise end in a division by zero or a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from spannorm_megatron.config.environment import variable_problem
from spannorm_megatron.errors import ConfigError

_VARIABLES = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _read(name: str) -> int:
    why = variable_problem(name)  # the variable's declared kind: a count
    if why:
        raise ConfigError(why)
    text = os.environ.get(name, "").strip()
    return int(text) if text else _VARIABLES[name]


def launch_environment() -> LaunchEnvironment:
    """This process's place in the launch (see the module docstring)."""
    env = LaunchEnvironment(*(_read(name) for name in _VARIABLES))
    for name, size, index in (("WORLD_SIZE", env.world_size, env.rank),
                              ("LOCAL_WORLD_SIZE", env.local_world_size, env.local_rank)):
        if size < 1:
            raise ConfigError(f"{name}=0 in the environment: a launch has at least one rank. "
                              f"Unset it to run a single process, or launch with torchrun.")
    if env.rank >= env.world_size:
        raise ConfigError(f"RANK={env.rank} in the environment is outside WORLD_SIZE="
                          f"{env.world_size}: unset both to run a single process, or launch "
                          f"with torchrun.")
    if env.local_rank >= env.local_world_size:
        raise ConfigError(f"LOCAL_RANK={env.local_rank} in the environment is outside "
                          f"LOCAL_WORLD_SIZE={env.local_world_size}: unset both, or launch "
                          f"with torchrun.")
    return env
