"""Sweeps: a base experiment and a grid of config values, every point an ordinary run.

A sweep file (``configs/sweeps/<name>.toml``)::

    [sweep]
    name = "depth_init"                     # the sweep directory: <out>/sweeps/<name>/
    base = "vanishing/sigmoid_baseline"     # an experiment config (group/name or a path)
    description = "..."

    [set]                                   # optional: the same for every point
    training.epochs = 5
    "model.kernel_initializer" = { class_name = "VarianceScaling", config = { scale = 1.0 } }

    [grid]                                  # every combination of these lists is a point
    model.activation = ["sigmoid", "tanh", "relu"]
    model.depth = [2, 4, 8]

Keys are dotted config keys. Under ``[set]`` a quoted key (``"model.kernel_initializer"``)
keeps a table value whole; under ``[grid]`` every value is a list.

Layout of ``<out>/sweeps/<name>/``: ``points/<point>/`` (an ordinary run directory each),
``sweep.csv`` (one row per point: its parameters, status, diagnosis verdict, ratios) and
``sweep.json`` (the sweep's definition). Points run in workers that return their run
directory's files to this process, which writes them: the workers need no shared disk. A
point whose directory is complete (status completed or diverged) and was made with the
settings the point has now (its whole config: base, ``[set]`` and grid values, in
``settings.json``) is skipped when the sweep runs again; a failed one, or one made with other
settings (the base or ``[set]`` edited), is run again, and its old row leaves sweep.csv at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w

from experiments import worker
from experiments.config import (
    CONFIGS_DIR,
    FILE,
    ConfigError,
    ExperimentConfig,
    load_config,
    read_toml,
)
from experiments.parallel import EXECUTORS, program_key, run_many
from experiments.ray_tasks import check_ray_address
from gradtools.history import CONFIG_FILE, FINAL_STATUSES, INFO_FILE, History, RunDirectoryError, run_status
from gradtools.loggers.base import plain

SWEEPS_DIR = CONFIGS_DIR / "sweeps"
#: How a point can end: as a run (completed, diverged) or not (failed: bad value or error).
DONE = FINAL_STATUSES


RESULT_COLUMNS = ("status", "verdict", "first_nonfinite_step", "ratio_first_step",
                  "ratio_first_epoch", "ratio_last_epoch", "ratio", "grad_norm_first_step",
                  "last_epoch_loss", "epochs_completed", "wall_seconds", "error")


@dataclass(frozen=True)
class Point:
    """One grid point: dotted config key -> value."""

    params: dict[str, Any]

    @property
    def id(self) -> str:
        """A name that depends on the values only (not on the grid's order), so a grid that
        grows keeps the points it already ran."""
        text = json.dumps(self.params, sort_keys=True)
        return "point-" + hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Sweep:
    source: str
    name: str
    base: str
    description: str
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]

    def points(self) -> list[Point]:
        keys = list(self.grid)
        return [Point(dict(zip(keys, values))) for values in itertools.product(*self.grid.values())]


def find_sweep(reference: str | Path) -> Path:
    path = Path(reference)
    for candidate in (path, SWEEPS_DIR / path, SWEEPS_DIR / path.with_suffix(".toml"),
                      CONFIGS_DIR / path.with_suffix(".toml")):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.toml"))) or "none"
    raise ConfigError(str(reference), FILE, str(reference),
                      f"no such sweep file; available in configs/sweeps: {available}")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(value, dotted)
        else:
            yield dotted, value


def load_sweep(reference: str | Path) -> Sweep:
    """Read and check a sweep file (the points' configs are checked when it runs: one bad
    value fails its points only, one that fails every point fails the file). Raises
    :class:`ConfigError`."""
    path = find_sweep(reference)
    source = str(path)
    raw = read_toml(path)
    unknown = set(raw) - {"sweep", "set", "grid"}
    if unknown:
        section = sorted(unknown)[0]
        raise ConfigError(source, f"[{section}]", raw[section], "unknown section; allowed: sweep, set, grid")
    head = raw.get("sweep", {})
    for key in ("name", "base"):
        if not isinstance(head.get(key), str) or not head[key].strip():
            raise ConfigError(source, f"sweep.{key}", head.get(key, "(missing)"), "is required: a string")
    if not all(c.isalnum() or c in "_-" for c in head["name"]):  # it names a folder under --out
        raise ConfigError(source, "sweep.name", head["name"], "must be a name of letters, digits, '_' or '-'")
    extra = set(head) - {"name", "base", "description"}
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(source, f"sweep.{key}", head[key], "unknown key; allowed: name, base, description")
    try:
        load_config(head["base"])
    except ConfigError as error:
        raise ConfigError(source, "sweep.base", head["base"], f"is not a usable config ({error})") from None
    fixed = {}
    for key, value in raw.get("set", {}).items():
        if "." in key:  # a quoted dotted key: the value is taken whole, a table included
            fixed[key] = value
        elif isinstance(value, dict):  # section.key = value, read by TOML as a table
            fixed.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            raise ConfigError(source, f"set.{key}", value, "must be <section>.<key> = value")
    grid = dict(_flatten(raw.get("grid", {})))
    if not grid:
        raise ConfigError(source, "[grid]", {}, "needs at least one key with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(source, f"grid.{key}", values, "must be a non-empty list of values")
        if key in fixed:
            raise ConfigError(source, f"grid.{key}", values, "is also in [set]: keep it in one of the two")
    return Sweep(source, head["name"], head["base"], head.get("description", ""), fixed, grid)


# --- one point ---------------------------------------------------------------------------------

def point_config(sweep: Sweep, point: Point) -> ExperimentConfig:
    """The point's validated config: the base, then [set], then the point's values."""
    config = load_config(sweep.base, settings={**sweep.fixed, **point.params},
                         settings_from=f"sweep {sweep.source}")
    return config.replace("experiment", name=f"{config.name}-{point.id}")


#: The sweep.csv columns a point's run summary fills: column -> RunSummary field.
POINT_NUMBERS = {"verdict": "verdict", "ratio_first_step": "ratio_first_step",
                 "ratio_first_epoch": "ratio_first_epoch", "ratio_last_epoch": "ratio_last_epoch",
                 "ratio": "first_to_last_ratio", "grad_norm_first_step": "grad_norm_first_step",
                 "last_epoch_loss": "last_epoch_loss"}


def summarize_point(history) -> dict[str, Any]:
    """The sweep.csv numbers of one run: how it ended, its diagnosis, the layer-1/last
    ``grad_abs_mean`` ratio at the first step, over the first and last epochs and the run,
    and the size of the whole gradient (global norm) at the first step."""
    from gradtools.summary import summarize

    summary = summarize(history)
    row: dict[str, Any] = {"status": summary.status, "first_nonfinite_step": summary.first_nonfinite_step,
                           "epochs_completed": summary.epochs_completed,
                           "wall_seconds": round(summary.wall_seconds, 3)}
    if summary.first_layer is None:
        return row
    row.update({column: getattr(summary, name) for column, name in POINT_NUMBERS.items()})
    return row


def run_sweep_point(config) -> dict:
    """Run one sweep point in a temporary directory; return its sweep.csv row and its run
    directory's files (name -> bytes), for the caller to write wherever the sweep lives.
    An error is returned as a failed row, never raised: one bad point must not stop a sweep.
    (The models and programs stay: the next point of the program reuses them.)"""
    import tempfile
    import traceback
    from pathlib import Path

    worker.quiet_tensorflow()  # a Ray task runs here without start()
    from experiments.runner import run_experiment

    with tempfile.TemporaryDirectory(prefix="gradtools-point-") as scratch:
        run_dir = Path(scratch) / "run"
        failure = None
        try:
            with worker.job_in_progress():
                row = summarize_point(run_experiment(config, run_dir=run_dir, figures=False).history)
        except Exception as error:  # noqa: BLE001 — recorded in sweep.csv, with its traceback
            row = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            failure = traceback.format_exc()
        files = {str(p.relative_to(run_dir)): p.read_bytes()
                 for p in sorted(run_dir.rglob("*")) if p.is_file()} if run_dir.exists() else {}
    if failure is not None:
        files["traceback.txt"] = failure.encode()
    return {"row": row, "files": files}


# --- running a sweep ---------------------------------------------------------------------------

class SweepDirectory:
    """``<out>/sweeps/<name>/``: point directories written whole, and sweep.csv."""

    def __init__(self, out: str | Path, sweep: Sweep):
        self.sweep = sweep
        self.path = Path(out) / "sweeps" / sweep.name
        self.points_dir = self.path / "points"
        self.table_path = self.path / "sweep.csv"
        self.points_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _claim(self.path)
        (self.path / "sweep.json").write_text(json.dumps(
            {"name": sweep.name, "source": sweep.source, "base": sweep.base,
             "description": sweep.description, "set": sweep.fixed, "grid": sweep.grid}, indent=2) + "\n")
        self.rows: dict[str, dict[str, Any]] = {}
        for record in self._read_table():
            self.rows[record["point"]] = self._with_new_columns(record)

    def _read_table(self) -> list[dict[str, Any]]:
        """sweep.csv's rows; a damaged or empty one is rebuilt from the point directories,
        which are the truth, and a finished point a cut table lacks is taken from its directory."""
        if not self.table_path.is_file():
            return []
        try:
            table = pd.read_csv(self.table_path, keep_default_na=False)
            if "point" not in table or "status" not in table:
                raise ValueError("no point or status column")
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            warnings.warn(f"{self.table_path} is damaged ({error}); rebuilt from the point "
                          "directories", RuntimeWarning, stacklevel=2)
            return self._rows_from_points()
        rows = table.to_dict("records")
        missing = self._rows_from_points(besides={str(row["point"]) for row in rows})
        if missing:
            warnings.warn(f"{self.table_path} lacks {len(missing)} finished points; taken from their "
                          "directories", RuntimeWarning, stacklevel=2)
        return rows + missing

    def _rows_from_points(self, besides: set[str] = frozenset()) -> list[dict[str, Any]]:
        """The rows of the finished points, from their directories (but the points ``besides``)."""
        rows = []
        for point in self.sweep.points():
            run_dir = self.points_dir / point.id
            if point.id in besides or run_status(run_dir) not in DONE:
                continue
            try:
                history = History.from_run_dir(run_dir)
            except RunDirectoryError:
                continue  # damaged: it runs again
            rows.append({"point": point.id, **{k: _cell(v) for k, v in point.params.items()},
                         **summarize_point(history), "run_dir": str(run_dir)})
        return rows

    def release(self) -> None:
        self._lock.close()

    def _with_new_columns(self, record: dict[str, Any]) -> dict[str, Any]:
        """A finished point from a sweep.csv written before a result column existed gets it
        from its run directory (nothing is trained again)."""
        run_dir = self.points_dir / str(record["point"])
        missing = set(RESULT_COLUMNS) - set(record) - {"error"}
        if missing and record.get("status") in DONE and (run_dir / INFO_FILE).is_file():
            record = {**record, **summarize_point(History.from_run_dir(run_dir))}
        return record

    def is_done(self, point: Point, config: ExperimentConfig | ConfigError) -> bool:
        """Its row and its run directory's run.json both say it finished (a damaged or
        unfinished run.json runs the point again), and it was made with ``config``."""
        row = self.rows.get(point.id)
        run_dir = self.points_dir / point.id
        return (row is not None and row["status"] in DONE and run_status(run_dir) in DONE
                and isinstance(config, ExperimentConfig) and _made_with(run_dir, config))

    def forget(self, points: list[Point]) -> None:
        """Drop the rows of ``points`` (about to run again): sweep.csv never shows a result
        made with settings the sweep no longer has."""
        if any(self.rows.pop(point.id, None) is not None for point in points):
            self.write_table()

    def record(self, point: Point, row: dict[str, Any], files: Mapping[str, bytes] = {},
               config: ExperimentConfig | None = None) -> None:
        """Write the point's files and the settings they were made with (into a temporary
        directory renamed into place, so a killed sweep never leaves half a point), then its row."""
        target = self.points_dir / point.id
        if files and config is not None:
            files = {**files, SETTINGS_FILE: settings_text(config).encode()}
        if files:
            partial = self.points_dir / f"{point.id}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            for name, data in files.items():
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                (partial / name).write_bytes(data)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        self.rows[point.id] = {"point": point.id, **{k: _cell(v) for k, v in point.params.items()},
                               **row, "run_dir": str(target) if files else ""}
        self.write_table()

    def write_table(self) -> None:
        order = {p.id: i for i, p in enumerate(self.sweep.points())}
        rows = sorted(self.rows.values(), key=lambda r: order.get(r["point"], len(order)))
        columns = ["point", *self.sweep.grid, *RESULT_COLUMNS, "run_dir"]
        table = pd.DataFrame(rows)
        table = table.reindex(columns=columns + [c for c in table.columns if c not in columns])
        partial = self.table_path.with_suffix(".csv.partial")
        table.to_csv(partial, index=False)
        os.replace(partial, self.table_path)


#: In each point directory: the point's whole config when it ran.
SETTINGS_FILE = "settings.json"


def settings_text(config: ExperimentConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str, indent=1) + "\n"


def _made_with(run_dir: Path, config: ExperimentConfig) -> bool:
    """The point directory was made with ``config``: its settings.json says so, or (written
    before there was one) its config.toml holds the same config."""
    try:
        return (run_dir / SETTINGS_FILE).read_text() == settings_text(config)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        stored = tomllib.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stored == tomllib.loads(tomli_w.dumps(plain(config.to_dict())))


def _claim(path: Path):
    """Hold ``<sweep>/.lock`` for this process (released when it ends, however it ends): a
    second invocation on the same sweep stops at once instead of running its points again."""
    lock = (path / ".lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(str(path), FILE, "", f"this sweep is being run by {owner}; wait for it "
                          "to finish (or stop it) and run again: finished points are kept") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


def _cell(value: Any) -> Any:
    """A parameter as sweep.csv holds it: numbers and strings as they are, others as JSON."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


class Progress:
    """``sweep <name>: 12/40 points (1 failed), 1m03s, ETA 2m20s`` on stderr after each point."""

    def __init__(self, name: str, total: int, already: int, quiet: bool = False):
        self.name, self.total, self.done, self.quiet = name, total, already, quiet
        self.failed, self.started, self.ran = 0, time.perf_counter(), 0

    def point_done(self, status: str) -> None:
        self.done += 1
        self.ran += 1
        self.failed += status not in DONE
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.ran * (self.total - self.done)
        failed = f" ({self.failed} failed)" if self.failed else ""
        print(f"sweep {self.name}: {self.done}/{self.total} points{failed}, {_duration(elapsed)}, "
              f"ETA {_duration(eta)}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class SweepResult:
    directory: Path
    table: pd.DataFrame
    ran: int
    skipped: int
    failed: int
    wall_seconds: float


def run_sweep(sweep: Sweep, out: str | Path = "runs", executor: str = "local", workers: int = 1,
              ray_address: str | None = None, quiet: bool = False) -> SweepResult:
    """Run every point not already done, with ``executor`` (``local``: ``workers`` processes;
    ``ray``: Ray tasks, on this machine or the cluster at ``ray_address``)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if executor == "ray" and ray_address:
        check_ray_address(ray_address)  # before anything is written
    started = time.perf_counter()
    configs = _point_configs(sweep, quiet)  # before anything is written
    directory = SweepDirectory(out, sweep)
    try:
        todo, progress = _start(directory, sweep, configs, executor, workers, quiet)
        jobs = _jobs(directory, configs, todo, progress)

        def finished(point: Point, result: dict[str, Any]) -> None:
            directory.record(point, result["row"], result["files"], configs[point.id])
            progress.point_done(result["row"]["status"])

        if jobs:
            run_many(run_sweep_point, [config for _, config in jobs], [program_key(config) for _, config in jobs],
                     lambda index, result: finished(jobs[index][0], result), executor, workers, ray_address)
        directory.write_table()
    finally:
        directory.release()
    table = pd.read_csv(directory.table_path)
    points = sweep.points()
    return SweepResult(directory.path, table, ran=len(todo), skipped=len(points) - len(todo),
                       failed=int((~table["status"].isin(DONE)).sum()),
                       wall_seconds=time.perf_counter() - started)


def _start(directory: SweepDirectory, sweep: Sweep, configs: dict, executor: str, workers: int, quiet: bool):
    """The points still to run (their old rows dropped), and the progress line that counts them."""
    points = sweep.points()
    todo = [p for p in points if not directory.is_done(p, configs[p.id])]
    directory.forget(todo)
    progress = Progress(sweep.name, len(points), len(points) - len(todo), quiet)
    if not quiet:
        print(f"sweep {sweep.name}: {len(points)} points, {len(points) - len(todo)} already done, "
              f"{len(todo)} to run ({executor}, {workers} worker{'s' * (workers != 1)})",
              file=sys.stderr, flush=True)
    return todo, progress


#: Seconds between two lines of progress while a large sweep's configs are checked.
CHECK_PROGRESS_EVERY = 5.0


def _point_configs(sweep: Sweep, quiet: bool = True) -> dict[str, ExperimentConfig | ConfigError]:
    """Each point's config, or why its values make none. When no point has one, the file
    itself is wrong (an unknown key, a bad [set] value): its first point's ConfigError.
    Unless ``quiet``, a line every few seconds says how far the check is (a grid of 10⁵
    points takes minutes)."""
    configs: dict[str, ExperimentConfig | ConfigError] = {}
    points = sweep.points()
    said = time.monotonic()
    for number, point in enumerate(points, start=1):
        if not quiet and time.monotonic() - said >= CHECK_PROGRESS_EVERY:
            print(f"sweep {sweep.name}: checking each point's config, {number - 1}/{len(points)}",
                  file=sys.stderr, flush=True)
            said = time.monotonic()
        try:
            configs[point.id] = point_config(sweep, point)
        except ConfigError as error:
            configs[point.id] = error
    errors = [c for c in configs.values() if isinstance(c, ConfigError)]
    if errors and len(errors) == len(configs):
        raise errors[0]
    return configs


def _jobs(directory: SweepDirectory, configs: dict, todo: list[Point], progress: Progress):
    """(point, config) to run; a point whose values are not a valid config fails on its own."""
    jobs = []
    for point in todo:
        config = configs[point.id]
        if isinstance(config, ConfigError):
            directory.record(point, {"status": "failed", "error": str(config)})
            progress.point_done("failed")
        else:
            jobs.append((point, config))
    return jobs
