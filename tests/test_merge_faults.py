"""Faults during a streaming merge (issue 14: 3, 6, 8): signals, leftovers of dead merges, permissions, a full disk,
an output folder that appears mid-merge. Each ends in one line naming the path, a non-zero exit, nothing left."""
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("safetensors.torch")

import infigw.merge.streaming as streaming  # noqa: E402
from infigw.merge import merge_safetensors, remove_dead_merges  # noqa: E402
from infigw.merge.__main__ import main as cli_main  # noqa: E402
from tests.test_merge import _tiny_states, _write_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A merge through the CLI that pauses inside the first tensor (its temporary folder and first shard open) after
# writing READY; argv: base, out, ready file, models...
PAUSED_MERGE = """
import sys, time, pathlib
import infigw.merge.streaming as streaming
from infigw.merge.__main__ import main
real = streaming.merge_tensor
def paused(*args, **kwargs):
    pathlib.Path(sys.argv[3]).write_text("ready")
    time.sleep(120)
    yield from real(*args, **kwargs)
streaming.merge_tensor = paused
sys.exit(main(["--base", sys.argv[1], "--out", sys.argv[2], "--models", *sys.argv[4:], "--method", "average",
               "--no-progress"]))
"""


@pytest.fixture
def checkpoints(tmp_path):
    base, models = _tiny_states(2, seed=5)
    return _write_set(tmp_path, base, models)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _start_paused(base_dir, dirs, out, ready):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", PAUSED_MERGE, str(base_dir), str(out), str(ready),
                              *map(str, dirs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the paused merge did not start: {child.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return child


def test_sigkill_leftovers_are_removed_later_and_live_merges_never(tmp_path, checkpoints):
    base_dir, dirs = checkpoints
    out = tmp_path / "out"
    killed = _start_paused(base_dir, dirs, out, tmp_path / "ready1")
    [dead] = _leftovers(tmp_path)
    assert dead.startswith(".out.tmp-") and (tmp_path / dead / streaming.LOCK_NAME).is_file()
    assert remove_dead_merges(out) == [], "a live merge's folder must not be removed"
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert _leftovers(tmp_path) == [dead], "SIGKILL cannot be handled: the folder stays until the next merge"
    (tmp_path / ".out.tmp-notours").mkdir()  # no lock file: not a merge folder, never touched

    live = _start_paused(base_dir, dirs, out, tmp_path / "ready2")  # the next merge removes the dead folder
    try:
        names = _leftovers(tmp_path)
        assert dead not in names and ".out.tmp-notours" in names and len(names) == 2, names
        assert "left by a merge that died" in live.stderr.readline()
        assert remove_dead_merges(out) == []
        assert len(_leftovers(tmp_path)) == 2, "the live merge's folder survives remove_dead_merges"
    finally:
        live.send_signal(signal.SIGTERM)
        _, err = live.communicate(timeout=30)
    assert live.returncode == 143 and "terminated by SIGTERM" in err, err
    assert _leftovers(tmp_path) == [".out.tmp-notours"], "SIGTERM is handled like Ctrl-C: nothing left"
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_follows_the_umask(tmp_path, checkpoints, umask):
    base_dir, dirs = checkpoints
    (base_dir / "tokenizer.json").write_text("{}")
    os.chmod(base_dir / "tokenizer.json", 0o600)  # copied files get the umask's mode, not the source's
    previous = os.umask(umask)
    try:
        out = merge_safetensors(base_dir, dirs, tmp_path / "out", "average", max_shard_size=300)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def _cli_fails(capsys, argv, *fragments) -> str:
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _argv(base_dir, dirs, out):
    return ["--base", str(base_dir), "--models", *map(str, dirs), "--out", str(out), "--method", "average",
            "--no-progress"]


def test_permission_denied_on_the_parent(tmp_path, checkpoints, capsys, monkeypatch):
    base_dir, dirs = checkpoints
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: fail where a user's mkdtemp fails
        def denied(prefix, dir):
            raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x"))

        monkeypatch.setattr(streaming.tempfile, "mkdtemp", denied)
    else:
        parent.chmod(0o500)
    try:
        _cli_fails(capsys, _argv(base_dir, dirs, parent / "out"), "Permission denied", str(parent))
    finally:
        parent.chmod(0o700)
    assert list(parent.iterdir()) == []


def test_disk_full_leaves_nothing(tmp_path, checkpoints, capsys, monkeypatch):
    base_dir, dirs = checkpoints
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith(".safetensors") and "w" in mode:
            return real_open("/dev/full", mode, *args, **kwargs)  # every write fails with ENOSPC
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(streaming, "open", full_disk, raising=False)
    _cli_fails(capsys, _argv(base_dir, dirs, tmp_path / "out"), "No space left on device", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("appears_as", ["empty folder", "folder with a file", "file"])
def test_output_appearing_mid_merge(tmp_path, checkpoints, capsys, monkeypatch, appears_as):
    base_dir, dirs = checkpoints
    out = tmp_path / "out"
    real = streaming.merge_tensor

    def racing(*args, **kwargs):
        if not out.exists():
            if appears_as == "file":
                out.write_text("someone else's")
            else:
                out.mkdir()
                if appears_as == "folder with a file":
                    (out / "theirs.txt").write_text("someone else's")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "merge_tensor", racing)
    _cli_fails(capsys, _argv(base_dir, dirs, out), "appeared during the merge", str(out))
    assert _leftovers(tmp_path) == [], "the discarded merge's folder is removed"
    if appears_as == "file":
        assert out.read_text() == "someone else's"
    else:
        assert sorted(p.name for p in out.iterdir()) == ([] if appears_as == "empty folder" else ["theirs.txt"])


def test_errors_inside_the_merge_remove_the_temporary_folder(tmp_path, checkpoints, monkeypatch):
    base_dir, dirs = checkpoints

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "merge_tensor", broken)
    with pytest.raises(KeyboardInterrupt):
        merge_safetensors(base_dir, dirs, tmp_path / "out", "average")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_sigterm_handler_is_restored(tmp_path, checkpoints):
    base_dir, dirs = checkpoints
    merge_safetensors(base_dir, dirs, tmp_path / "out", "average")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
