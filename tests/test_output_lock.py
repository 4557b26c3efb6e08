"""core/files.py OutputLock on real files and a real ``flock`` holder: a held folder is seen by a
probe that creates nothing, a killed run's file blocks nothing, and a lock file unlinked by its
releasing holder between another process's open and flock is never taken as the lock."""

import os
import subprocess
import sys
import time

from ds_unlearn.core.files import LOCK_NAME, OutputLock


def hold(path):
    """Another process holding ``path``'s flock, as a running ds-unlearn would."""
    # One process that holds it itself (``flock FILE sleep`` hands the lock to its child, which a
    # kill of flock leaves holding it).
    code = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    for _ in range(200):
        if path.exists() and OutputLock(path.parent).held():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("flock never took the lock")


def test_held_probe_creates_nothing_and_sees_another_holder(tmp_path):
    out = tmp_path / "a" / "b"
    assert not OutputLock(out).held() and not (tmp_path / "a").exists()  # no folder: nothing held
    out.mkdir(parents=True)
    holder = hold(out / LOCK_NAME)
    try:
        lock = OutputLock(out)
        assert lock.held()
        start = time.time()
        assert not lock.acquire() and lock.handle is None
        assert time.time() - start < 1.0  # ATTEMPTS x 50 ms, not a wait for the holder
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(out)
    assert not lock.held() and lock.acquire()
    assert (out / LOCK_NAME).read_text() == f"{os.getpid()} on {os.uname().nodename}"
    other = OutputLock(out)
    assert other.held() and other.holder == f"{os.getpid()} on {os.uname().nodename}"
    lock.release()
    assert not (out / LOCK_NAME).exists() and out.is_dir()  # not created by acquire: kept


def test_a_killed_runs_lock_file_blocks_nothing(tmp_path):
    (tmp_path / LOCK_NAME).write_text("4194304 on elsewhere")  # the pid of a run killed by SIGKILL
    lock = OutputLock(tmp_path)
    assert not lock.held() and lock.acquire()
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"{os.getpid()} on ")
    lock.release()


def test_acquire_never_takes_a_file_its_holder_unlinked(tmp_path, monkeypatch):
    """The flock-and-unlink race: a holder releasing (unlink, then close) while another process
    has opened the old file and then gets its flock would hold a lock on no path at all, and a
    third run would lock the new file too. acquire checks the path is still the file it locked."""
    import ds_unlearn.core.files as files

    lock, opened = OutputLock(tmp_path / "out"), []
    real_flock = files.fcntl.flock

    def flock_after_unlink(handle, op):
        if not opened:  # the first attempt: the path is replaced between open and flock
            opened.append(handle)
            os.unlink(lock.path)
            lock.path.write_text("someone else's")
        return real_flock(handle, op)

    monkeypatch.setattr(files.fcntl, "flock", flock_after_unlink)
    assert lock.acquire()
    assert os.fstat(lock.handle.fileno()).st_ino == os.stat(lock.path).st_ino and len(opened) == 1
    assert lock.path.read_text().startswith(f"{os.getpid()} on ")
    lock.release()
    assert not (tmp_path / "out").exists()  # acquire made it, release removed it
