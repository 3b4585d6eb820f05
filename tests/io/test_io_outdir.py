import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest

import batchv4.io.outdir as outdir
from batchv4.io.outdir import LOCK, MARKER, OutputFolderError, OutputLockedError, claim_output, is_ephemeral

REPO = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()


@pytest.fixture
def mem_url():
    url = f"memory://outdir-{uuid.uuid4().hex}/out"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def old_manifest(fingerprint):
    # What batchv4 wrote before folder markers existed (see writers._empty_manifest).
    return {"format": "batchv4-output", "version": 1, "parts": [], "error_parts": [], "rows": 0,
            "meta": {"fingerprint": fingerprint}}


def lock_record(path):
    return json.loads(Path(path, LOCK).read_text())


# -- is this folder ours ------------------------------------------------------------------------


def test_non_empty_unmarked_folder_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    for name in ("part-00000.parquet", "a.txt", "b.txt", "c.txt"):
        (out / name).write_bytes(b"the user's own")
    before = sorted(os.listdir(out))
    with pytest.raises(OutputFolderError) as e:
        claim_output(str(out), fingerprint="fp")
    assert not isinstance(e.value, OutputLockedError)
    assert str(e.value) == (f"{out} is not empty and holds no batchv4 run (found 'a.txt', 'b.txt', 'c.txt', ...): "
                            "choose a new or empty folder")
    assert sorted(os.listdir(out)) == before
    assert (out / "part-00000.parquet").read_bytes() == b"the user's own"


def test_non_empty_unmarked_object_store_folder_is_refused(mem_url):
    fs, path = fsspec.core.url_to_fs(mem_url)
    fs.pipe_file(f"{path}/manifest.json", b'{"something": "else"}')   # not a batchv4 manifest
    with pytest.raises(OutputFolderError, match=r"\(found 'manifest.json'\)"):
        claim_output(mem_url, fingerprint="fp")
    assert fs.ls(path, detail=False) == [f"{path}/manifest.json"]


def test_our_own_hidden_temporaries_do_not_make_a_folder_foreign(tmp_path):
    for name in (".batchv4-probe-1", ".part-00000.parquet.tmp-1", ".errors-00000.parquet.tmp-1",
                 ".manifest.json.tmp-1"):
        (tmp_path / name).write_bytes(b"x")
    with claim_output(str(tmp_path), fingerprint="fp") as claim:
        assert claim.fresh


def test_folder_with_only_an_old_style_manifest_is_marked(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(old_manifest("old-fp")))
    (tmp_path / "part-00000.parquet").write_bytes(b"parquet")
    with claim_output(str(tmp_path), fingerprint="new-fp") as claim:
        assert not claim.fresh
        assert claim.previous_fingerprint == "old-fp"
        assert not (tmp_path / MARKER).exists()   # whether to adopt the folder is the caller's call


def test_fresh_folder_gets_the_marker_and_a_marked_one_keeps_it(tmp_path):
    out = tmp_path / "new" / "d"
    with claim_output(str(out), fingerprint="fp1") as claim:
        assert claim.fresh and claim.previous_fingerprint is None
        marker = json.loads((out / MARKER).read_text())
        assert {k: marker[k] for k in ("format", "version", "fingerprint")} == {
            "format": "batchv4-output-folder", "version": 1, "fingerprint": "fp1"}
        assert marker["updated_at"].endswith("+00:00")
    with claim_output(str(out), fingerprint="fp2") as claim:
        assert not claim.fresh and claim.previous_fingerprint == "fp1"
        assert json.loads((out / MARKER).read_text())["fingerprint"] == "fp1"
        claim.write_marker("fp2", overwritten=True)
    marker = json.loads((out / MARKER).read_text())
    assert marker["fingerprint"] == "fp2" and marker["overwritten"] is True
    assert not [n for n in os.listdir(out) if n != MARKER]   # no lock, no temporaries left


def test_a_file_is_refused_as_the_output_folder(tmp_path):
    (tmp_path / "f").write_bytes(b"user data")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        claim_output(str(tmp_path / "f"), fingerprint="fp")
    assert (tmp_path / "f").read_bytes() == b"user data"


def test_broken_marker_is_refused(tmp_path):
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(OutputFolderError, match="is not a batchv4 folder marker"):
        claim_output(str(tmp_path), fingerprint="fp")


# -- the local lock -----------------------------------------------------------------------------


def test_second_claim_while_held_is_refused_naming_the_holder(tmp_path):
    with claim_output(str(tmp_path), fingerprint="fp"):
        with pytest.raises(OutputLockedError) as e:
            claim_output(str(tmp_path), fingerprint="fp")
    message = str(e.value)
    assert f"is in use by another batchv4 run (pid {os.getpid()} on host {HOST} since " in message
    assert message.endswith(f"if no such run is alive, delete {tmp_path}/{LOCK}")
    assert not (tmp_path / LOCK).exists()
    claim_output(str(tmp_path), fingerprint="fp").release()


def test_a_live_process_keeps_us_out_until_killed_with_sigkill(tmp_path):
    code = ("import sys, time\nfrom batchv4.io.outdir import claim_output\n"
            "claim_output(sys.argv[1], fingerprint='fp')\nprint('held', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid} on host "):
            claim_output(str(tmp_path), fingerprint="fp")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert lock_record(tmp_path)["pid"] == proc.pid   # the killed run left its lock behind
    with claim_output(str(tmp_path), fingerprint="fp") as claim:
        assert lock_record(tmp_path)["pid"] == os.getpid()
        assert not claim.fresh and claim.previous_fingerprint == "fp"


def _race(out, start, done):
    start.wait()
    try:
        claim_output(out, fingerprint="fp")
        code = 0
    except OutputLockedError:
        code = 3
    done.wait()   # hold the lock (if won) until every racer has tried
    os._exit(code)


def test_racing_takeovers_of_one_stale_lock_have_exactly_one_winner(tmp_path):
    ctx = multiprocessing.get_context("fork")
    stale = {"pid": dead_pid(), "host": HOST, "started": "2026-01-01T00:00:00+00:00", "token": "dead"}
    for _ in range(15):
        (tmp_path / LOCK).write_text(json.dumps(stale))
        racers = 6
        start, done = ctx.Barrier(racers), ctx.Barrier(racers)
        procs = [ctx.Process(target=_race, args=(str(tmp_path), start, done)) for _ in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        codes = sorted(p.exitcode for p in procs)
        assert codes == [0] + [3] * (racers - 1)
        winner = next(p for p in procs if p.exitcode == 0)
        assert lock_record(tmp_path)["pid"] == winner.pid
        assert sorted(os.listdir(tmp_path)) == [MARKER, LOCK]   # no guard or temporary left behind


def test_half_written_lock_waits_then_counts_as_stale_when_old(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "_LOCAL_RETRY_S", 0.1)
    (tmp_path / LOCK).write_bytes(b'{"pid": 12')
    with pytest.raises(OutputLockedError, match="its lock is being written"):
        claim_output(str(tmp_path), fingerprint="fp")
    os.utime(tmp_path / LOCK, (time.time() - 60, time.time() - 60))
    with claim_output(str(tmp_path), fingerprint="fp"):
        assert lock_record(tmp_path)["pid"] == os.getpid()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "T", "token": "x"}))
    with pytest.raises(OutputLockedError, match="on host elsewhere since T"):
        claim_output(str(tmp_path), fingerprint="fp")


def test_release_removes_the_lock_only_when_it_is_ours(tmp_path):
    claim = claim_output(str(tmp_path), fingerprint="fp")
    theirs = json.dumps({"pid": 1, "host": "elsewhere", "started": "T", "token": "theirs"})
    (tmp_path / LOCK).write_text(theirs)
    claim.release()
    assert (tmp_path / LOCK).read_text() == theirs
    (tmp_path / LOCK).unlink()
    claim = claim_output(str(tmp_path), fingerprint="fp")
    claim.release()
    assert not (tmp_path / LOCK).exists()
    claim.release()   # idempotent


def test_lock_is_released_when_a_signal_interrupts_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with claim_output(str(tmp_path), fingerprint="fp"):
            assert (tmp_path / LOCK).exists()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert not (tmp_path / LOCK).exists()


# -- the object-store lease ---------------------------------------------------------------------


def test_lease_keeps_a_second_claim_out_until_release(mem_url):
    fs, path = fsspec.core.url_to_fs(mem_url)
    with claim_output(mem_url, fingerprint="fp") as claim:
        assert claim.fresh
        assert json.loads(fs.cat_file(f"{path}/{MARKER}"))["fingerprint"] == "fp"
        assert json.loads(fs.cat_file(f"{path}/{LOCK}"))["expires"] > time.time()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on host "):
            claim_output(mem_url, fingerprint="fp")
    assert not fs.exists(f"{path}/{LOCK}")
    with claim_output(mem_url, fingerprint="fp") as claim:
        assert not claim.fresh and claim.previous_fingerprint == "fp"


def test_lease_is_renewed_while_held(mem_url):
    with claim_output(mem_url, fingerprint="fp", lease_seconds=0.45) as claim:
        time.sleep(1.0)   # more than two leases: without renewal it would have expired
        with pytest.raises(OutputLockedError):
            claim_output(mem_url, fingerprint="fp")
        assert not claim.lost


def test_lease_of_a_dead_run_is_taken_over_after_it_expires(mem_url):
    fs, path = fsspec.core.url_to_fs(mem_url)
    fs.pipe_file(f"{path}/{MARKER}", json.dumps({"format": "batchv4-output-folder", "fingerprint": "fp"}).encode())
    dead = {"pid": 1, "host": "elsewhere", "started": "T", "token": "dead", "expires": time.time() + 0.5}
    fs.pipe_file(f"{path}/{LOCK}", json.dumps(dead).encode())
    with pytest.raises(OutputLockedError, match="pid 1 on host elsewhere since T"):
        claim_output(mem_url, fingerprint="fp")
    time.sleep(0.55)
    with claim_output(mem_url, fingerprint="fp", lease_seconds=0.3):
        assert json.loads(fs.cat_file(f"{path}/{LOCK}"))["pid"] == os.getpid()
    assert not fs.exists(f"{path}/{LOCK}")


def test_is_ephemeral():
    assert is_ephemeral("memory://x/out")
    assert not is_ephemeral("/tmp/out")
    assert not is_ephemeral("file:///tmp/out")
    assert not is_ephemeral("s3://bucket/out")
