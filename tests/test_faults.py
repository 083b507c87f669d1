"""Faults a real user hits, injected for real: signals at awkward moments, kill -9, a file
size limit that makes writes fail mid-run, unusable output paths, damaged run directories and
sweep tables, bad values, Ctrl-C on multi-run commands, and a second sweep on the same
directory. Each asserts the exit code, the message, and that nothing written before the fault
is lost or left half-written."""

import fcntl
import json
import resource
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, start_cli


def wait_for(condition, process, timeout=120, every=0.01):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()}")
        time.sleep(every)
    raise AssertionError("timed out")


def leftovers(root: Path) -> list[Path]:
    """Files a fault must not leave behind: partial writes and empty figures."""
    return [p for p in root.rglob("*") if p.name.endswith(".partial")
            or (p.suffix == ".png" and p.stat().st_size == 0)]


def one_run_dir(root: Path) -> Path:
    (info,) = list(root.glob("*/*/*/run.json"))
    return info.parent


# --- the run's status is durable ----------------------------------------------------------------

def test_ctrl_c_while_figures_are_drawn_keeps_the_finished_status(tmp_path):
    process = start_cli(["run", "vanishing/sigmoid_baseline", "--out", "runs", "--quiet"], tmp_path)
    figure = wait_for(lambda: next(iter(tmp_path.glob("runs/*/*/*/figures/*.png*")), None), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    info = json.loads((figure.parent.parent / "run.json").read_text())
    assert info["status"] == "completed" and info["epochs_completed"] == 100
    assert "Traceback" not in stderr and stderr.count("interrupted") == 1
    assert leftovers(tmp_path) == []


def test_kill_9_leaves_an_honest_record_and_a_cut_last_row_is_dropped(tmp_path):
    process = start_cli(["run", "vanishing/sigmoid_baseline", "--set", "training.epochs=100000",
                         "--out", "runs", "--quiet"], tmp_path)

    def progressed():
        found = list(tmp_path.glob("runs/*/*/*/run.json"))
        return found and json.loads(found[0].read_text()).get("epochs_completed", 0) >= 3 and found[0]

    info_file = wait_for(progressed, process, every=0.05)
    process.kill()
    process.wait()
    info = json.loads(info_file.read_text())
    metrics = pd.read_csv(info_file.parent / "metrics.csv")
    assert info["status"] == "running" and info["epochs_completed"] >= 3
    assert metrics["epoch"].nunique() >= info["epochs_completed"], "every recorded epoch's rows are there"

    text = (info_file.parent / "metrics.csv").read_bytes()
    (info_file.parent / "metrics.csv").write_bytes(text[:-20])  # the append a kill -9 cut short
    result = run_cli(["diagnose", str(info_file.parent)], cwd=tmp_path, module="gradtools")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning:") == 1 and "cut short" in result.stderr
    assert "did not finish" in result.stdout and "NaN" not in result.stdout.splitlines()[1]


def file_size_limit(size):
    """A ``preexec_fn``: files of the process cannot grow past ``size`` bytes (EFBIG, as a full
    disk gives ENOSPC)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def compilation_cache(monkeypatch, directory):
    """The commands this test starts use this cache directory (``off``: none)."""
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)  # it names the suite's own cache
    monkeypatch.setenv("GRADTOOLS_XLA_CACHE", str(directory))


def test_a_write_error_mid_run_is_one_line_exit_1_and_rolled_back(tmp_path, monkeypatch):
    """A 400 kB file size limit: metrics.csv cannot grow past it a few epochs in. (No
    compilation cache: a program new to it would hit the limit first, as the next test does.)"""
    compilation_cache(monkeypatch, "off")
    process = start_cli(["run", "vanishing/sigmoid_baseline", "--out", "runs", "--quiet"], tmp_path,
                        preexec_fn=file_size_limit(400_000))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not write") and "metrics.csv" in lines[0]
    run_dir = one_run_dir(tmp_path / "runs")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["epochs_completed"] >= 1
    text = (run_dir / "metrics.csv").read_text()
    assert text.endswith("\n") and len({line.count(",") for line in text.splitlines()}) == 1, \
        "no half row"
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 94 * info["epochs_completed"]
    assert leftovers(tmp_path) == []


def test_a_compilation_cache_that_cannot_be_written_is_one_line_exit_1(tmp_path, monkeypatch):
    """XLA fails the compilation when its cache entry cannot be written (here over a 100 kB
    file size limit; a full disk the same), and again at every retry: the run cannot go on.
    It said so with a TensorFlow traceback."""
    compilation_cache(monkeypatch, tmp_path / "xla")
    process = start_cli(["run", "vanishing/sigmoid_baseline", "--out", "runs", "--quiet"], tmp_path,
                        preexec_fn=file_size_limit(100_000))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write {tmp_path / 'xla'}"), lines
    assert "File too large" in lines[0] and "GRADTOOLS_XLA_CACHE=off" in lines[0]
    info = json.loads((one_run_dir(tmp_path / "runs") / "run.json").read_text())
    assert info["status"] == "failed" and info["epochs_completed"] == 0


# --- bad input: exit 2 before anything runs -----------------------------------------------------

@pytest.mark.parametrize("overrides, key, allowed", [
    (["--set", "training.clip_value=nan"], "training.clip_value", "finite"),
    (["--set", "optimizer.config.learning_rate=-0.1"], "optimizer.config.learning_rate", "> 0"),
    (["--set", "optimizer.config.learning_rate=inf"], "optimizer.config.learning_rate", "finite"),
    (["--seed", "4294967296"], "training.seed", "4294967295"),
    (["--set", "data.n_samples=1", "--set", "data.standardize_targets=true"],
     "data.standardize_targets", "same value"),
    (["--set", "data.n_informative=0", "--set", "data.noise=0.0", "--set", "data.standardize_targets=true"],
     "data.standardize_targets", "same value"),
])
def test_bad_values_are_refused_naming_file_key_value_and_what_is_allowed(tmp_path, overrides, key, allowed):
    from experiments.cli import main

    config = "exploding/relu_baseline"
    with _stderr(tmp_path) as captured:
        code = main(["run", config, *overrides, "--out", str(tmp_path / "runs"), "--quiet"])
    assert code == 2
    message = captured.read()
    assert message.startswith("error: ") and "relu_baseline.toml" in message
    assert key in message and allowed in message
    assert not list((tmp_path / "runs").rglob("run.json")), "nothing ran"


class _stderr:
    """Captures what a main() prints on stderr."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "stderr.txt"

    def __enter__(self):
        self.stream = self.path.open("w")
        self.saved, sys.stderr = sys.stderr, self.stream
        return self

    def __exit__(self, *exc):
        sys.stderr = self.saved
        self.stream.close()
        return False

    def read(self):
        return self.path.read_text()


@pytest.mark.parametrize("make_out, reason", [
    (lambda tmp: (tmp / "a-file").write_text("x") and tmp / "a-file", "is a file"),
    (lambda tmp: Path("/proc/gradtools-cannot-be-here"), "cannot be written"),
])
def test_an_unusable_out_is_exit_2_before_training(tmp_path, make_out, reason):
    from experiments.cli import main

    out = make_out(tmp_path)
    with _stderr(tmp_path) as captured:
        code = main(["run", "vanishing/shallow", "--out", str(out), "--quiet"])
    assert code == 2
    message = captured.read()
    assert message.startswith("error: --out") and str(out) in message and reason in message


def test_a_batch_larger_than_the_data_trains_on_one_batch_like_model_fit(tmp_path):
    from experiments.cli import main

    code = main(["run", "vanishing/shallow", "--set", "training.batch_size=5000", "--set",
                 "data.n_samples=200", "--set", "training.epochs=3", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    metrics = pd.read_csv(one_run_dir(tmp_path) / "metrics.csv")
    assert metrics["step"].tolist() == [1, 2, 3] and (metrics["batch"] == 0).all()


# --- damaged run directories and tables ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from experiments.cli import main

    root = tmp_path_factory.mktemp("runs")
    for seed in (1, 2):
        assert main(["run", "vanishing/shallow", "--set", "training.epochs=2", "--seed", str(seed),
                     "--out", str(root / "runs"), "--quiet"]) == 0
    return root


def test_damaged_run_directories_are_a_clear_error_alone_and_skipped_in_a_glob(two_runs, tmp_path):
    good = sorted((two_runs / "runs" / "vanishing" / "shallow").iterdir())
    header_only = tmp_path / "runs" / "vanishing" / "shallow" / "empty"
    corrupt = tmp_path / "runs" / "vanishing" / "shallow" / "corrupt"
    for damaged, source in ((header_only, good[0]), (corrupt, good[1])):
        damaged.mkdir(parents=True)
        (damaged / "run.json").write_text((source / "run.json").read_text())
        (damaged / "metrics.csv").write_text((source / "metrics.csv").read_text().splitlines()[0] + "\n")
    (corrupt / "run.json").write_text('{"status": "comp')

    alone = run_cli(["diagnose", str(header_only)], cwd=tmp_path, module="gradtools")
    assert alone.returncode == 2 and "no logged steps" in alone.stderr and str(header_only) in alone.stderr
    broken = run_cli(["diagnose", str(corrupt)], cwd=tmp_path, module="gradtools")
    assert broken.returncode == 2 and "run.json is damaged" in broken.stderr
    assert "Traceback" not in alone.stderr + broken.stderr

    for run_dir in good:
        target = tmp_path / "runs" / "vanishing" / "shallow" / run_dir.name
        target.mkdir()
        for name in ("run.json", "metrics.csv"):
            (target / name).write_bytes((run_dir / name).read_bytes())
    out_dir = tmp_path / "figures"
    out_dir.mkdir()
    compared = run_cli(["compare", str(tmp_path / "runs" / "vanishing" / "shallow" / "*"),
                        "--out", str(out_dir)], cwd=tmp_path, module="gradtools")
    assert compared.returncode == 0, compared.stderr
    assert compared.stdout.strip().endswith(str(out_dir / "comparison.png"))
    assert "compared 2 runs" in compared.stdout and (out_dir / "comparison.png").is_file()
    assert compared.stderr.count("warning: skipped") == 2



def _damaged(metrics=None, info=None):
    """How to damage a copy of a run directory: its metrics.csv's text (lines) or its run.json."""
    return {"metrics": metrics, "info": info}


DAMAGE = {
    "bytes that are not text": (_damaged(metrics=lambda lines: None), "metrics.csv is damaged: it is not text"),
    "a row cut short before the last": (_damaged(metrics=lambda lines: [*lines[:3], lines[3][:20], *lines[4:]]),
                                        "metrics.csv is damaged: line 4 has "),
    "a value that is not a number": (_damaged(metrics=lambda lines: [lines[0], "abc" + lines[1][1:], *lines[2:]]),
                                     "metrics.csv is damaged: column 'step' holds values that are not numbers"),
    "a run.json entry of another kind": (_damaged(info=lambda info: {**info, "layer_paths": 5}),
                                         "run.json is damaged: 'layer_paths' is 5, not what a run directory holds"),
    "block_downstream of another kind": (_damaged(info=lambda info: {**info, "block_downstream": {"dense": 5}}),
                                         "run.json is damaged: 'block_downstream' is {'dense': 5}, not what"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_kind_of_damage_is_one_line_naming_the_file(two_runs, tmp_path, capsys, damage):
    """They were tracebacks (UnicodeDecodeError, TypeError, ValueError), or, for a row cut
    short before the last, a silent "exploding" verdict (NaN/Inf at that step)."""
    import json

    from gradtools.__main__ import main

    how, message = DAMAGE[damage]
    source = sorted((two_runs / "runs" / "vanishing" / "shallow").iterdir())[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = json.loads((source / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(how["info"](info) if how["info"] else info))
    lines = (source / "metrics.csv").read_text().splitlines(keepends=True)
    if how["metrics"] is None:
        (run_dir / "metrics.csv").write_text("".join(lines))
    elif how["metrics"](lines) is None:
        (run_dir / "metrics.csv").write_bytes(b"\x8d\xff\x00step" * 50)
    else:
        (run_dir / "metrics.csv").write_text("".join(how["metrics"](lines)))
    capsys.readouterr()
    for command in (["diagnose", str(run_dir)], ["compare", str(run_dir), "--out", str(tmp_path / "c.png")]):
        assert main(command) == 2, command
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and message in stderr and str(run_dir) in stderr, stderr
    assert not (tmp_path / "c.png").exists()


def test_a_figure_that_cannot_be_written_is_one_line_naming_it(two_runs, tmp_path):
    """matplotlib's error on a full disk names no file: the message was 'error: No space left
    on device' (and, from python -m experiments, spoke of a run.json)."""
    run_dir = sorted((two_runs / "runs" / "vanishing" / "shallow").iterdir())[0]
    out = tmp_path / "c.png"
    result = run_cli(["compare", str(run_dir), "--out", str(out)], tmp_path, module="gradtools",
                     preexec_fn=file_size_limit(20_000))
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"error: could not write {out}: File too large\n", result.stderr

SWEEP = """
[sweep]
name = "tiny"
base = "vanishing/shallow"

[set]
training.epochs = 1
data.n_samples = 200

[grid]
training.seed = [1, 2, 3, 4]
"""

#: Six programs (depths), each point long enough that a Ctrl-C lands while points are running.
LONG_SWEEP = """
[sweep]
name = "long"
base = "vanishing/sigmoid_baseline"

[set]
training.epochs = 250
data.n_samples = 1000

[grid]
optimizer.config.learning_rate = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
"""  # one program: each of the two workers runs three points in one call


def test_a_damaged_sweep_table_is_rebuilt_and_a_second_sweep_is_refused(tmp_path, capsys):
    from experiments.cli import main

    (tmp_path / "tiny.toml").write_text(SWEEP.replace("[1, 2, 3, 4]", "[1, 2]"))
    sweep = ["sweep", str(tmp_path / "tiny.toml"), "--workers", "1", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(sweep) == 0
    table = tmp_path / "out" / "sweeps" / "tiny" / "sweep.csv"
    before = pd.read_csv(table)
    table.write_text("point,sta")  # a cut write
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="damaged .*rebuilt from the point directories"):
        assert main(sweep) == 0
    assert "0 points run, 2 already done" in capsys.readouterr().out
    after = pd.read_csv(table)
    assert after[["point", "status", "verdict"]].equals(before[["point", "status", "verdict"]])
    table.write_text(",".join(before.columns) + "\n")  # cut after its header: the points ran again
    with pytest.warns(RuntimeWarning, match="lacks 2 finished points; taken from their directories"):
        assert main(sweep) == 0
    assert "0 points run, 2 already done" in capsys.readouterr().out
    assert pd.read_csv(table)[["point", "status", "verdict"]].equals(before[["point", "status", "verdict"]])
    (table.parent / "points" / str(after["point"].iloc[0]) / "run.json").write_text("{cut")
    assert main(sweep) == 0
    assert "1 points run, 1 already done" in capsys.readouterr().out, "a damaged run.json runs again"

    with (tmp_path / "out" / "sweeps" / "tiny" / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a sweep in progress holds it
        held.truncate(0)
        held.write("pid 4242")
        held.flush()
        assert main(sweep) == 2
    assert "being run by pid 4242" in capsys.readouterr().err


# --- Ctrl-C on commands that run many runs ------------------------------------------------------

def test_ctrl_c_on_a_sweep_stops_within_seconds_keeps_finished_points_and_resumes(tmp_path, capsys, monkeypatch):
    (tmp_path / "long.toml").write_text(LONG_SWEEP)
    process = start_cli(["sweep", "long.toml", "--workers", "2", "--out", "out", "--quiet"], tmp_path)
    table = tmp_path / "out" / "sweeps" / "long" / "sweep.csv"
    wait_for(lambda: table.is_file(), process, timeout=180, every=0.05)
    interrupted_at = time.time()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.time() - interrupted_at < 15, "queued points are cancelled, not run"
    done = pd.read_csv(table)
    # each worker's call has three points: a point is kept when it finishes, not its call
    assert 1 <= len(done) <= 2 and (done["status"] == "completed").all(), done
    assert "Traceback" not in stderr
    assert not list((tmp_path / "out" / "sweeps" / "long" / "points").glob("*.partial"))

    # resumed in this process (one worker: the points' numbers do not depend on the executor)
    from experiments.cli import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["sweep", "long.toml", "--workers", "1", "--out", "out", "--quiet"]) == 0
    assert f"{6 - len(done)} points run, {len(done)} already done" in capsys.readouterr().out
    assert (pd.read_csv(table)["status"] == "completed").sum() == 6


def test_a_worker_killed_mid_sweep_is_one_line_exit_1_and_finished_points_are_kept(tmp_path, capsys,
                                                                                 monkeypatch):
    """kill -9 of one worker process (as the kernel's out-of-memory killer does) while the
    command runs in this process: no traceback, and what finished stays."""
    import os
    import threading

    from experiments.cli import main

    (tmp_path / "long.toml").write_text(LONG_SWEEP)
    table = tmp_path / "out" / "sweeps" / "long" / "sweep.csv"
    killed = []

    def kill_a_worker_once_a_point_is_done():
        deadline = time.time() + 180
        while not table.is_file() and time.time() < deadline:
            time.sleep(0.05)
        workers = [pid for pid in children(os.getpid()) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    killer = threading.Thread(target=kill_a_worker_once_a_point_is_done, daemon=True)
    killer.start()
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "long.toml", "--workers", "2", "--out", "out", "--quiet"])
    killer.join(5)
    stderr = capsys.readouterr().err
    assert killed, "no worker to kill"
    assert code == 1, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("error: a worker process ended abruptly"), stderr
    done = pd.read_csv(table)
    assert 1 <= len(done) < 6 and (done["status"] == "completed").all(), done
    assert not list((tmp_path / "out" / "sweeps" / "long" / "points").glob("*.partial"))


def test_kill_9_of_a_sweep_ends_its_workers_too(tmp_path):
    """The command killed with -9 (its terminal closed, the out-of-memory killer): its two
    spawned workers and multiprocessing's resource tracker end with it (they were left,
    reparented to init, waiting for ever to hand results to nobody)."""
    import os

    (tmp_path / "long.toml").write_text(LONG_SWEEP)
    process = start_cli(["sweep", "long.toml", "--workers", "2", "--out", "out", "--quiet"], tmp_path)

    def its_processes():
        found = children(process.pid)
        workers = [pid for pid in found if b"spawn_main" in _cmdline(pid)]
        return found if len(workers) == 2 else None

    started = wait_for(its_processes, process, timeout=120, every=0.05)
    assert any(b"resource_tracker" in _cmdline(pid) for pid in started), [_cmdline(pid) for pid in started]
    process.kill()
    process.wait(timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in started):
        time.sleep(0.1)
    assert not [pid for pid in started if _alive(pid)], [_cmdline(pid) for pid in started if _alive(pid)]
    assert os.path.isdir(tmp_path / "out"), "it had started"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_keeps_the_items_a_group_finished_in_the_commands_own_process():
    """One worker: a program's items run here one after the other, and each is handed on as
    it finishes (the two-worker case is the sweep above)."""
    from experiments.parallel import run_many

    received = {}

    def two_then_ctrl_c(item):
        if item == 3:
            raise KeyboardInterrupt
        return item * 10

    with pytest.raises(KeyboardInterrupt):
        run_many(two_then_ctrl_c, [1, 2, 3], ["one program"] * 3, received.__setitem__)
    assert received == {0: 10, 1: 20}


def test_ctrl_c_on_seed_runs_keeps_finished_runs_and_marks_none_failed(tmp_path):
    process = start_cli(["run", "vanishing/shallow", "--seeds", "6", "--workers", "2",
                         "--set", "training.epochs=40", "--out", "runs", "--quiet"], tmp_path)
    wait_for(lambda: any(json.loads(p.read_text())["status"] == "completed"
                         for p in tmp_path.glob("runs/*/*/*/run.json")), process, timeout=180, every=0.05)
    interrupted_at = time.time()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    stopped_in = time.time() - interrupted_at
    assert process.returncode == 130, stderr
    assert stopped_in < 15, stopped_in
    statuses = [json.loads(p.read_text())["status"] for p in tmp_path.glob("runs/*/*/*/run.json")]
    assert "completed" in statuses and "failed" not in statuses and len(statuses) < 6, statuses
    assert set(statuses) <= {"completed", "interrupted", "running"}, statuses
    assert "Traceback" not in stderr, stderr


def test_half_a_reported_item_blocks_neither_the_loop_nor_the_stop():
    """A worker that dies while reporting a finished point leaves half an item in the items
    pipe: the items before it are handed on at once, the loop is not held waiting for the
    rest, and once the workers are gone the half item reads as the end (written by hand)."""
    import multiprocessing
    import os
    import struct

    from experiments.parallel import STOP_GRACE_SECONDS, _Items

    items, received = _Items(multiprocessing.get_context("spawn")), []
    items.queue.put((0, 0, "a finished point"))
    os.write(items.queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"half an item")
    time.sleep(0.5)
    started = time.monotonic()
    items.take(lambda *item: received.append(item))
    assert received == [(0, 0, "a finished point")] and time.monotonic() - started < 0.1
    items.close(lambda *item: received.append(item))
    assert not items.reader.is_alive() and len(received) == 1
    assert time.monotonic() - started < STOP_GRACE_SECONDS


def test_a_stopped_pool_ends_even_with_half_a_result_in_its_pipe():
    """A worker ended while sending a point's files leaves half a message in the result pipe;
    the pool's manager thread must not wait for the rest forever (a Ctrl-C'd sweep once hung
    at exit that way). The half message is written here by hand, as a dying worker leaves it."""
    import multiprocessing
    import os
    import struct
    from concurrent.futures import ProcessPoolExecutor

    from experiments.parallel import STOP_GRACE_SECONDS, _stop

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    assert pool.submit(os.getpid).result(timeout=60) > 0  # the worker and the manager run
    manager = pool._executor_manager_thread
    os.write(pool._result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"half a result")
    time.sleep(0.5)
    assert manager.is_alive(), "the manager waits for the rest of the message"
    started = time.monotonic()
    _stop(pool)
    assert not manager.is_alive()
    assert time.monotonic() - started < STOP_GRACE_SECONDS + 2


# --- where the output goes ----------------------------------------------------------------------

def test_an_ascii_terminal_a_reader_that_went_away_and_a_table_missing_a_column(tmp_path):
    """Under PYTHONIOENCODING=ascii the summary's × and ‖ are escaped (a UnicodeEncodeError
    traceback after a completed run, exit 1, before); `| true` closes the pipe at once: exit 0,
    no word (it was 'could not write …: Broken pipe', exit 1); diagnose of a metrics.csv
    without a column names the file and the columns, exit 2 (a KeyError traceback before)."""
    import os
    import subprocess

    from conftest import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "ascii"}
    command = [sys.executable, "-m", "experiments", "run", "vanishing/shallow", "--set", "training.epochs=1",
               "--out", "out"]
    ascii_run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ascii_run.returncode == 0, ascii_run.stderr
    assert "\\xd7" in ascii_run.stdout and "Traceback" not in ascii_run.stderr
    closed = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    closed.stdout.close()  # as `| true` does
    stderr = closed.stderr.read().decode()
    assert closed.wait(timeout=300) == 0, stderr
    assert "Broken pipe" not in stderr and "Traceback" not in stderr, stderr

    run_dir = next((tmp_path / "out").rglob("run.json")).parent
    for broken in ("ascii", "closed"):
        diagnose = [sys.executable, "-m", "gradtools", "diagnose", str(run_dir)]
        if broken == "ascii":
            said = subprocess.run(diagnose, env=env, capture_output=True, text=True, timeout=60)
            assert said.returncode == 0 and "\\u2016" in said.stdout, said.stderr
        else:
            reader = subprocess.Popen(diagnose, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            reader.stdout.close()
            assert reader.wait(timeout=60) == 0 and reader.stderr.read() == b""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    metrics.drop(columns=["loss", "layer_2/grad_norm"]).to_csv(run_dir / "metrics.csv", index=False)
    said = run_cli(["diagnose", str(run_dir)], tmp_path, module="gradtools")
    assert said.returncode == 2
    assert said.stderr.strip() == (f"error: {run_dir / 'metrics.csv'} lacks the columns loss, layer_2/grad_norm: "
                                   "not the table a run directory holds")


def test_a_page_or_table_that_cannot_be_written_whole_keeps_the_old_one(tmp_path):
    """The report's index.html, the claims' tables, gallery.md and conformance.md are written
    as run.json is (write_atomically): a write cut by a full disk (here a file-size limit)
    names the file and leaves the complete old one (report replaced it by a truncated page)."""
    import subprocess

    from conftest import REPO_ROOT

    page = tmp_path / "index.html"
    page.write_text("<html>the old, complete report</html>")
    script = ("import resource, signal, sys\n"
              "from pathlib import Path\n"
              "from gradtools.loggers.local import write_atomically\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
              "try:\n"
              f"    write_atomically(Path({str(page)!r}), lambda p: p.write_text('x' * 5000))\n"
              "except OSError as error:\n"
              "    print(error.filename, error.strerror)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"{page} File too large", done.stderr
    assert page.read_text() == "<html>the old, complete report</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"], "no partial file left"


@pytest.mark.parametrize("kind", ["dangling link", "link loop", "long name"])
def test_an_out_that_cannot_be_made_is_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, kind):
    """A --out through a symbolic link to nothing, or with a name over 255 bytes, was found
    only when the run first wrote (exit 1, empty folders left)."""
    import os

    from experiments.cli import main

    monkeypatch.chdir(tmp_path)
    if kind == "dangling link":
        os.symlink(tmp_path / "gone", "out")
        out, words = "out/runs", "out is a symbolic link to nothing"
    elif kind == "link loop":
        os.symlink("loop_b", "loop_a")
        os.symlink("loop_a", "loop_b")
        out, words = "loop_a", "loop_a is a symbolic link to nothing"
    else:
        out, words = "runs/" + "n" * 300, "has a name of 300 bytes; file systems take at most 255"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", "vanishing/shallow", "--out", out]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing made"


def test_a_tensorboard_log_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path):
    """Its event file stops at a file-size limit (as on a full disk) while the run directory's
    files stay under it: one warning line, the run completes with every epoch (it failed, and
    the command called TensorFlow's error 'out of memory')."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # the events pass it by epoch 8

    process = start_cli(["run", "vanishing/shallow", "--set", "training.epochs=20", "--logger", "tensorboard",
                         "--out", "out", "--quiet"], tmp_path, preexec_fn=limited)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: TensorBoard failed while logging"), lines
    assert "File too large" in lines[0] and "the local run directory is complete" in lines[0]
    info = json.loads(next((tmp_path / "out").rglob("run.json")).read_text())
    assert info["status"] == "completed" and info["epochs_completed"] == 20
