"""One run per --save: the lock is the kernel's, so a killed holder never leaves it stale."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

import launch
from spannorm_megatron.checkpoint import CheckpointError
from spannorm_megatron.checkpoint.lock import LOCK_FILENAME, SaveDirectoryLock


def _hold_in_another_process(save_dir: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from spannorm_megatron.checkpoint.lock import SaveDirectoryLock\n"
         f"SaveDirectoryLock({save_dir!r}).acquire()\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, env=launch.environment())
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    save = str(tmp_path / "run")
    holder = _hold_in_another_process(save)
    try:
        with pytest.raises(CheckpointError, match=rf"in use by another run \(PID {holder.pid} on "
                           rf"{socket.gethostname()}, since .*choose another --save"):
            SaveDirectoryLock(save).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with SaveDirectoryLock(save) as lock:  # the kernel released it with the dead process
        assert lock.held and lock.unprotected is None
        with pytest.raises(CheckpointError, match=rf"PID {os.getpid()}"):
            SaveDirectoryLock(save).acquire()  # a lock is per open file: held against this one too
    assert not lock.held
    SaveDirectoryLock(save).acquire().release()
    assert os.path.isfile(os.path.join(save, LOCK_FILENAME))


def test_spannorm_train_on_a_held_save_directory_is_refused_and_writes_nothing(tmp_path, capsys):
    """A second spannorm-train on the --save of a running one stops before its model exists,
    naming the holder, and leaves the directory as it was; once the holder is gone it trains."""
    from fuzz_train import BASE
    from spannorm_megatron.train import main

    save = str(tmp_path / "run")
    holder = _hold_in_another_process(save)
    try:
        assert main([*BASE, "--save", save]) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (PID {holder.pid}" in err and "Traceback" not in err
        assert sorted(os.listdir(save)) == [LOCK_FILENAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main([*BASE, "--save", save]) == 0
    assert os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt"))

