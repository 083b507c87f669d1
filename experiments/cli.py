"""``python -m experiments``: run the article's experiments and draw its figures."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.config import FILE, ConfigError, config_groups, config_names, load_config
from experiments.worker import WorkerLost
from gradtools.backend import UnsupportedBackend
from gradtools.extras import MissingExtra, require
from gradtools.loggers.base import LoggerUnavailable
from gradtools.validation import nearest_existing

EXIT_BAD_INPUT = 2
EXIT_WRITE_ERROR = 1
EXIT_FAILED = 1  # failed sweep points, a wrong gallery verdict, a lost worker (what finished is kept)
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so the run directory is closed as interrupted."""


def _raise_terminated(signum, frame):
    raise Terminated()
DEFAULT_EXPERIMENT = "vanishing/sigmoid_baseline"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Reproduce the experiments of 'Vanishing and Exploding Gradients in Neural "
        "Network Models' and log per-layer gradient statistics for every step. Each process "
        "trains with one TensorFlow thread, as the suite's nets are too small to gain from more "
        "(gallery: every core); TF_NUM_INTRAOP_THREADS overrides it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_run_command, _add_list_command, _add_claims_command, _add_report_command,
                        _add_compare_command, _add_figures_command, _add_sweep_command,
                        _add_phase_diagram_command, _add_config_reference_command, _add_gallery_command,
                        _add_preflight_command, _add_conformance_command, _add_dashboard_command):
        add_command(commands)
    return parser


def _add_run_command(commands) -> None:
    run = commands.add_parser(
        "run", help="train one config and write its run directory",
        description="Train one config and write <out>/<group>/<name>/<run id>/ with config.toml, "
        "metrics.csv, run.json and figures/. Exit 0 for a completed or diverged run, 2 for a bad "
        "config, 130 when interrupted.",
    )
    run.add_argument("config", nargs="?", default=DEFAULT_EXPERIMENT,
                     help=f"a TOML file, or group/name under configs/ (default {DEFAULT_EXPERIMENT})")
    _add_common(run)
    seeding = run.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, help="shorthand for --set training.seed=N")
    seeding.add_argument("--seeds", type=int, metavar="N",
                         help="run seeds 0..N-1 (one run directory each) and write a group "
                         "summary seeds-<time>.csv and a mean-with-band figure seeds-<time>.png")
    run.add_argument("--run-figures", action="store_true",
                     help="with --seeds: draw each run's own figures too (by default only the band)")
    _add_workers(run)


def _add_list_command(commands) -> None:
    commands.add_parser("list", help="list the configs with their descriptions")


def _add_claims_command(commands) -> None:
    claims = commands.add_parser(
        "claims", help="check the 23 claims (the article's ten, then 13 from its sources) over several seeds",
        description="Run what the 23 claims (the article's ten, then 13 from its sources) need over "
        "seeds 0..N-1 and print, and write "
        "as <report>/claims.json and <report>/claims.md, one row per claim: the claim, its "
        "criterion, the measured numbers and in how many seeds it holds.")
    _add_seed_group_options(claims, report_help="where claims.* go (default report)")


def _add_report_command(commands) -> None:
    report = commands.add_parser(
        "report", help="write report/index.html: the claims, and the figures and diagnoses of their 28 experiments",
        description="Run the claims' experiments over seeds and write a self-contained static page "
        "<report>/index.html (images embedded; opens offline) with, per experiment, the article's "
        "figure, the multi-seed figure and the diagnosis, the claims table, and the phase "
        "diagram when <out>/sweeps/depth_init/sweep.csv exists (make phase-diagram).")
    _add_seed_group_options(report, report_help="output directory (default report)")


def _add_compare_command(commands) -> None:
    compare = commands.add_parser(
        "compare", help="the article's two comparisons from existing runs",
        description="Overlay layer-1 gradient magnitude across the six vanishing variants and across "
        "the four exploding variants, using the newest run of each experiment under --out "
        "(create them with `make figures`). Writes <figures>/compare_<group>.png.")
    compare.add_argument("--out", default="runs", help="where the runs are (default runs)")
    compare.add_argument("--figures", default="figures", help="where the figures go (default figures)")
    compare.add_argument("--stat", default="layer_1/grad_abs_mean",
                         help="the statistic (default layer_1/grad_abs_mean)")


def _add_figures_command(commands) -> None:
    figures = commands.add_parser(
        "figures", help="run every experiment and write the article's figures",
        description="Run every config of the chosen groups and write <figures>/<group>_<name>.png "
        "(the article's mean-gradient figure), <figures>/<group>_<name>_state_gradients.png "
        "(recurrent nets: ‖∂L/∂h_t‖ against r^(T−t)), <figures>/<group>_<name>_spikes.png (runs with "
        "a spike guard: the spikes on the loss and gradient-norm curves) and <figures>/<group>_comparison.png "
        "(layer-1 gradient magnitude of every variant, log scale; the loss, for spikes).",
    )
    figures.add_argument("--group", action="append", choices=config_groups(),
                         help="only this group (repeatable; default all)")
    figures.add_argument("--figures", default="figures", help="where the figures go (default figures)")
    _add_common(figures)


def _add_sweep_command(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="run every point of a sweep's grid (resumable)",
        description="Run every point of a sweep file's grid (configs/sweeps/*.toml: a base "
        "experiment, [set] values, a [grid] of lists) as an ordinary run directory under "
        "<out>/sweeps/<name>/points/, and write <out>/sweeps/<name>/sweep.csv: one row per point "
        "with its parameters, status, diagnosis verdict and layer-1/last gradient ratios. Points "
        "already completed are skipped, so an interrupted sweep resumes; a point that fails (a "
        "bad value in the grid, an error) is recorded as failed and the others go on. Exit 0 when "
        "every point ran, 1 when some failed, 2 for a bad sweep file.")
    sweep.add_argument("sweep", help="a sweep TOML file, or its name under configs/sweeps/")
    _add_sweep_options(sweep)


def _add_phase_diagram_command(commands) -> None:
    phase = commands.add_parser(
        "phase-diagram", help="the depth × initializer-scale sweep and its heatmaps",
        description="Run configs/sweeps/depth_init.toml (resumable) and draw "
        "<figures>/phase_diagram.png: per activation, log10 of the layer-1/last gradient "
        "magnitude ratio at the first step and after training, with the diagnosis on each cell, "
        "the article's two networks marked, and the 4^-depth bound for sigmoid.")
    phase.add_argument("--figures", default="figures", help="where the figure goes (default figures)")
    _add_sweep_options(phase)


def _add_config_reference_command(commands) -> None:
    commands.add_parser("config-reference", help="print docs/config.md: every config key, its "
                        "default and what it means")


def _add_gallery_command(commands) -> None:
    gallery = commands.add_parser(
        "gallery", help="diagnose the gallery of real architectures, healthy and broken",
        description="Train every gallery model (a convnet, a ResNet, a transformer, a BiLSTM, "
        "Conv1D and GRU sequence models, an MLP regressor, and four broken nets) with model.fit "
        "and GradientMonitor, diagnose each, and time plain model.fit against model.fit with the "
        "monitor. Prints a markdown table and writes it to <figures>/gallery.md, with each "
        "model's gradient heatmap as <figures>/gallery_<model>.png. Under KERAS_BACKEND=jax the "
        "same on JAX, into <figures>/gallery-jax.md, leaving out the model that needs TensorFlow.")
    gallery.add_argument("--seeds", type=int, default=1, help="seeds per model (default 1)")
    gallery.add_argument("--figures", default="figures", help="where the table and heatmaps go "
                         "(default figures)")
    gallery.add_argument("--no-timing", action="store_true",
                         help="skip the overhead measurement (about a minute)")
    gallery.add_argument("--spikes", action="store_true",
                         help="instead: train the transformer and the ResNet with bad batches injected "
                         "(wrong labels weighing 10³) with no guard and with each SpikeGuard action, against "
                         "a clean run; writes <figures>/gallery_spikes.md (about 3 minutes)")


def _add_preflight_command(commands) -> None:
    check = commands.add_parser(
        "preflight", help="before training: will each config's net vanish or explode? (no training)",
        description="Build each config's model and data as a run would (same seed) and run "
        "gradtools.preflight with its loss, optimizer and batch size: the verdict at initialization, one "
        "line per config; with --figures, its signal-propagation figure <figures>/preflight_<group>_<name>.png. "
        "Exit 2 for a bad config.")
    check.add_argument("configs", nargs="*", metavar="CONFIG",
                       help="TOML files or group/name under configs/ (default: every config)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable)")
    check.add_argument("--figures", help="write each config's signal-propagation figure in this folder")
    check.add_argument("--explain", action="store_true", help="print each verdict's explanation too")


def _add_conformance_command(commands) -> None:
    conformance = commands.add_parser(
        "conformance", help="check GradientMonitor and gradtools.fit against an independent GradientTape "
        "on the conformance zoo (keras-hub, keras.applications, keras-io; every mode)",
        description="For each model and mode of the zoo, train one epoch with model.fit + GradientMonitor "
        "and compare the recorded loss, global norm and every layer's gradient statistics at the first, "
        "second and last step with a GradientTape over model.compute_loss at the same weights (jax.grad under "
        "KERAS_BACKEND=jax, where the TensorFlow-only cases are left out); where gradtools.fit takes the model, "
        "compare it with the tape (at learning rate 0) and with model.fit (TensorFlow only). "
        "Prints the table and writes it to <figures>/conformance.md. Exit 1 when a cell is not what it "
        "should be (a difference, or a crash where a clear refusal or an exact record is due).")
    conformance.add_argument("--core", action="store_true", help="only the fast core that make test runs")
    conformance.add_argument("--only", action="append", metavar="TEXT", default=[],
                             help="only the cases whose model or mode contains TEXT (repeatable)")
    conformance.add_argument("--figures", default="figures", help="where conformance.md goes (default figures)")
    conformance.add_argument("--list", action="store_true", help="name the cases (model / mode) and stop")


def _add_dashboard_command(commands) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="serve the runs in MLflow's UI or TensorBoard, on 127.0.0.1",
        description="Serve the runs under --out: MLflow's run table and charts (runs made with "
        "--logger mlflow, stored in <out>/mlflow.db) or TensorBoard (runs made with --logger "
        "tensorboard). Only this machine can connect (127.0.0.1). Ctrl-C stops it.")
    dashboard.add_argument("--ui", default="tensorboard", help="mlflow or tensorboard (default tensorboard)")
    dashboard.add_argument("--out", default="runs", help="where the runs are (default runs)")
    dashboard.add_argument("--port", type=int, help="default 5000 for mlflow, 6006 for tensorboard")


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    from experiments.worker import default_workers

    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: worker processes on this machine (default); ray: Ray tasks "
                        "(needs pip install '.[distributed]')")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes (local) or CPUs for a Ray started here (default: the "
                        "cores, up to 2)")
    parser.add_argument("--ray-address", help="a running Ray cluster's address (default: start Ray "
                        "on this machine)")
    parser.add_argument("--out", default="runs", help="sweeps go to <out>/sweeps/<name>/ (default runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_seed_group_options(parser: argparse.ArgumentParser, report_help: str) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--epochs", type=int, help="override every experiment's epochs (default: each config's own, "
                        "100 for the MLPs, 40 for the recurrent nets)")
    parser.add_argument("--out", default="runs", help="where run directories go (default runs)")
    parser.add_argument("--report", default="report", help=report_help)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_workers(parser)


def _add_workers(parser: argparse.ArgumentParser) -> None:
    from experiments.worker import default_workers

    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes for the runs (default %(default)s: the cores, up to 2; "
                        "1 runs them in this process with progress lines)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value with a dotted key and a TOML value, "
                        "e.g. --set training.epochs=20 (repeatable)")
    parser.add_argument("--out", default="runs", help="where run directories go (default runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--logger", dest="backends", action="append", default=[],
                        choices=["neptune", "mlflow", "tensorboard"],
                        help="also log to this backend (repeatable); the run directory is always "
                        "written. TensorBoard files go to <run dir>/tensorboard; MLflow to "
                        "MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db")
    parser.add_argument("--neptune-mode", choices=["offline", "async", "sync", "debug"],
                        help="Neptune connection mode (default: NEPTUNE_MODE, else async with "
                        "NEPTUNE_API_TOKEN set, else offline)")
    parser.add_argument("--mlflow-every-row", action="store_true",
                        help="send every metrics.csv row to MLflow, not only each epoch's last one "
                        "(MLflow stores about 3,000 values a second: a 100-epoch run of the "
                        "article's net has 280,000)")


def describe_run(run) -> str:
    """The paragraph printed after a run."""
    from gradtools.history import FIGURES_DIR, INFO_FILE
    from gradtools.layers import layer_label
    from gradtools.summary import summarize

    history = run.history
    summary = summarize(history)
    lines = [f"{run.config.run_name} (seed {run.config.seed}): {history.status} after "
             f"{history.epochs_completed} full epochs in {history.wall_seconds:.2f} s"]
    if history.metrics.empty:
        return "\n".join(lines + [f"run: {run.run_dir}"])
    if history.first_nonfinite_step is not None:
        lines[0] += f"; loss or gradients became non-finite at step {history.first_nonfinite_step}"
    lines[0] += f". Final loss {summary.final_loss:.4g}."
    lines.append(
        f"Gradient magnitude (median grad_abs_mean over all steps): "
        f"{layer_label(summary.first_layer, history.layer_paths)} {summary.first_grad_abs_mean:.3g}, "
        f"{layer_label(summary.last_layer, history.layer_paths)} (last) "
        f"{summary.last_grad_abs_mean:.3g}: layer 1 gets {summary.first_to_last_ratio:.3g}× the "
        f"last layer's. Largest |grad_mean| of layer 1: {summary.max_abs_first_grad_mean:.3g}."
    )
    diagnosis = json.loads((run.run_dir / INFO_FILE).read_text()).get("diagnosis")
    if diagnosis:
        lines.append(f"Diagnosis: {diagnosis['verdict']}. {diagnosis['explanation']}")
    drawn = sorted(p.name for p in (run.run_dir / FIGURES_DIR).glob("*.png"))
    if "mean_gradient.png" in drawn:
        others = [name for name in drawn if name != "mean_gradient.png"]
        lines.append(f"Figure: {run.run_dir / 'figures' / 'mean_gradient.png'} (also {', '.join(others)})")
    lines.append(f"run: {run.run_dir}")
    return "\n".join(lines)


def _backends(args):
    """The logger backends asked for; an option of a backend not asked for is bad input."""
    from experiments.runner import Backends

    if args.neptune_mode is not None and "neptune" not in args.backends:
        raise ConfigError("--neptune-mode", "--neptune-mode", args.neptune_mode, "needs --logger neptune")
    if args.mlflow_every_row and "mlflow" not in args.backends:
        raise ConfigError("--mlflow-every-row", "--mlflow-every-row", "given", "needs --logger mlflow")
    return Backends(tuple(args.backends), args.neptune_mode, args.mlflow_every_row)


def _loggers(quiet: bool):
    from gradtools.loggers import ProgressLogger

    return [] if quiet else [ProgressLogger()]


def command_run(args) -> int:
    if args.seed is not None and any(o.split("=", 1)[0].strip() == "training.seed" for o in args.overrides):
        raise ConfigError("--seed", "--seed", args.seed, "training.seed is also given with --set: give one of the two")
    if args.workers < 1:
        raise ConfigError("--workers", "--workers", args.workers, "must be an integer >= 1")
    if args.run_figures and args.seeds is None:
        raise ConfigError("--run-figures", "--run-figures", "given", "needs --seeds (a single run draws its figures)")
    if args.seeds is not None:
        return command_run_seeds(args)
    overrides = list(args.overrides) + ([f"training.seed={args.seed}"] if args.seed is not None else [])
    config = load_config(args.config, overrides)
    from experiments.runner import run_experiment

    run = run_experiment(config, args.out, loggers=_loggers(args.quiet), backends=_backends(args))
    print(describe_run(run))
    return 0


def command_run_seeds(args) -> int:
    if args.seeds < 1:
        raise ConfigError("--seeds", "--seeds", args.seeds, "must be an integer >= 1")
    if args.workers < 1:
        raise ConfigError("--workers", "--workers", args.workers, "must be an integer >= 1")
    load_config(args.config, args.overrides)  # a bad config fails before any run
    from experiments.seeds import run_seeds

    group = run_seeds(args.config, list(range(args.seeds)), args.out, args.overrides,
                      loggers=lambda: _loggers(args.quiet), workers=args.workers,
                      run_figures=args.run_figures, backends=_backends(args))
    for run in group.runs:
        print(describe_run(run), end="\n\n")
    columns = [c for c in ("seed", "status", "first_nonfinite_step", "last_epoch_loss",
                           "first_to_last_grad_ratio") if c in group.summary]
    print(group.summary[columns].to_string(index=False))
    print(f"summary: {group.summary_path}\nfigure: {group.figure_path}")
    return 0


def command_list(_args) -> int:
    names = config_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:{width}s}  {load_config(name).experiment.description}")
    return 0


def command_figures(args) -> int:
    groups = args.group or config_groups()
    jobs = [(name, list(args.overrides)) for name in config_names() if name.split("/")[0] in groups]
    from experiments.figures import write_article_figures

    started = time.perf_counter()
    written = write_article_figures(jobs, Path(args.out), Path(args.figures),
                                    loggers=lambda: _loggers(args.quiet), backends=_backends(args))
    for path in written:
        print(f"figure: {path}")
    print(f"{len(jobs)} experiments and {len(written)} figures in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def newest_run(out: Path, config_name: str) -> Path:
    """The most recent completed-or-diverged run directory of ``group/name`` under ``out``."""
    from gradtools.history import FINAL_STATUSES, run_status

    candidates = sorted(p.parent for p in (out / config_name).glob("*/run.json"))
    finished = [run_dir for run_dir in candidates if run_status(run_dir) in FINAL_STATUSES]
    if not finished:
        raise ConfigError(str(out / config_name), FILE, "",
                          f"no finished run of {config_name}; create them with `make figures`")
    return finished[-1]


def article_variants(group: str) -> list[str]:
    """The configs of ``group`` that are the article's own models (each carries the article's
    name for it): what its comparison of that group overlays."""
    return [name for name in config_names()
            if name.startswith(group + "/") and load_config(name).experiment.article_name]


def command_compare(args) -> int:
    from gradtools.compare import CompareError, compare_runs, save_comparison

    out, figures = Path(args.out), Path(args.figures)
    drawn = {}  # both figures drawn before either is written: a failure writes nothing
    for group in ("vanishing", "exploding"):
        run_dirs = [str(newest_run(out, name)) for name in article_variants(group)]
        try:
            drawn[group] = compare_runs(run_dirs, args.stat)
        except CompareError as error:  # a statistic the runs do not have, a damaged run
            raise ConfigError(f"compare {group}", FILE, "", str(error)) from None
    for group, (figure, run_dirs) in drawn.items():
        target = save_comparison(figure, figures / f"compare_{group}.png")
        print(f"figure: {target} ({len(run_dirs)} {group} runs)")
    return 0


def _claim_runs(args, on_experiment=None):
    from experiments.claims import run_claim_experiments

    if args.seeds < 1:
        raise ConfigError("--seeds", "--seeds", args.seeds, "must be an integer >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError("--epochs", "--epochs", args.epochs, "must be an integer >= 1")
    if args.workers < 1:
        raise ConfigError("--workers", "--workers", args.workers, "must be an integer >= 1")
    return run_claim_experiments(list(range(args.seeds)), args.epochs, args.out,
                                 loggers=lambda: _loggers(args.quiet), workers=args.workers,
                                 on_experiment=on_experiment)


def command_claims(args) -> int:
    from experiments.claims import evaluate, write_claims

    results = evaluate(_claim_runs(args))
    json_path, md_path = write_claims(results, args.report)
    for r in results:
        print(f"{r.number:2d}. {r.verdict:28s} {r.claim}")
    print(f"claims: {md_path} and {json_path}")
    return 0


def command_report(args) -> int:
    import pandas as pd

    from experiments.phase_diagram import PHASE_SWEEP
    from experiments.report import experiment_section, write_report

    started = time.perf_counter()
    phase_csv = Path(args.out) / "sweeps" / PHASE_SWEEP / "sweep.csv"
    phase_table = pd.read_csv(phase_csv) if phase_csv.is_file() else None
    sections = {}

    def draw(name, runs):  # while the worker processes train the other experiments
        sections[name] = experiment_section(name, runs)

    page = write_report(_claim_runs(args, on_experiment=draw), Path(args.report), phase_table, sections)
    print(f"report: {page} ({time.perf_counter() - started:.0f} s)")
    return 0


def _sweep(args, reference):
    from experiments.sweep import load_sweep, run_sweep

    if args.workers < 1:
        raise ConfigError("--workers", "--workers", args.workers, "must be an integer >= 1")
    if args.ray_address and args.executor != "ray":
        raise ConfigError("--ray-address", "--ray-address", args.ray_address, "needs --executor ray")
    result = run_sweep(load_sweep(reference), args.out, executor=args.executor,
                       workers=args.workers, ray_address=args.ray_address, quiet=args.quiet)
    print(f"sweep: {result.directory / 'sweep.csv'} ({result.ran} points run, {result.skipped} "
          f"already done, {result.failed} failed; {result.wall_seconds:.0f} s)")
    return result


def command_sweep(args) -> int:
    result = _sweep(args, args.sweep)
    if result.failed:
        failed = result.table[~result.table["status"].isin(("completed", "diverged"))]
        for _, row in failed.head(5).iterrows():
            print(f"failed: {row['point']}: {row['error']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def command_phase_diagram(args) -> int:
    from experiments.phase_diagram import PHASE_SWEEP, write_phase_diagram

    result = _sweep(args, PHASE_SWEEP)
    target = write_phase_diagram(result.table, Path(args.figures))
    print(f"figure: {target}")
    return EXIT_FAILED if result.failed else 0


def command_gallery(args) -> int:
    from experiments.gallery import CASES, gallery_row, markdown_table, spike_table
    from gradtools.loggers.local import write_atomically
    from gradtools.plots import plot_gradient_heatmap

    if args.spikes:
        table = spike_table()
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(args.figures) / "gallery_spikes.md", lambda partial: partial.write_text(table))
        print(table + f"table: {Path(args.figures) / 'gallery_spikes.md'}")
        return 0

    if args.seeds < 1:
        raise ConfigError("--seeds", "--seeds", args.seeds, "must be an integer >= 1")
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    import keras

    backend = keras.backend.backend()  # on JAX: the cases that need TensorFlow are left out, saying why
    rows = []
    for case in CASES:
        if case.tensorflow_only and backend != "tensorflow":
            print(f"left out on {backend}: {case.name} ({case.tensorflow_only}: TensorFlow only)", flush=True)
            continue
        started = time.perf_counter()
        row = gallery_row(case, seeds=range(args.seeds), overhead=not args.no_timing)
        history = row.pop("heatmap")
        plot_gradient_heatmap(history.metrics, case.name, history.first_nonfinite_step,
                              history.layer_paths).savefig(figures / f"gallery_{case.name}.png", dpi=80)
        rows.append(row)
        print(f"{case.name}: {', '.join(row['verdicts'])} (expected {case.expected}; "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
    table = markdown_table(rows)
    page = figures / ("gallery.md" if backend == "tensorflow" else f"gallery-{backend}.md")
    write_atomically(page, lambda partial: partial.write_text(table))
    print(table + f"table: {page}")
    wrong = sum(v != row["expected"] for row in rows for v in row["verdicts"])
    return EXIT_FAILED if wrong else 0


def command_conformance(args) -> int:
    import keras

    from experiments.conformance import as_expected, markdown_table, run_case
    from experiments.provenance import provenance
    from experiments.zoo import CASES
    from gradtools.loggers.local import write_atomically

    backend = keras.backend.backend()  # on JAX: the monitor against jax.grad, the TensorFlow-only cases left out
    cases = [case for case in CASES if (case.core or not args.core)
             and (not args.only or any(text in f"{case.model} {case.mode}" for text in args.only))]
    if not cases:
        raise ConfigError("--only", FILE, None, f"{' or '.join(map(repr, args.only))} matches no case of the zoo "
                          "(python -m experiments conformance --list names them)")
    left_out = [case for case in cases if case.tensorflow_only and backend != "tensorflow"]
    if args.list:
        print("\n".join(f"{case.model} / {case.mode}" + (" (core)" if case.core else "")
                        + (f" (left out on {backend}: {case.tensorflow_only})" if case in left_out else "")
                        for case in cases))
        return 0
    cases = [case for case in cases if case not in left_out]
    if any("keras-hub" in case.model for case in cases):
        require("keras_hub", extra="zoo", feature="the conformance zoo's keras-hub models")
    for case in left_out:
        print(f"left out on {backend}: {case.model} / {case.mode} ({case.tensorflow_only}: TensorFlow only)")
    figures = Path(args.figures)
    results = []
    for number, case in enumerate(cases, start=1):
        results.append(run_case(case, core=args.core))
        print(f"[{number}/{len(cases)}] " + markdown_table(results[-1:]).splitlines()[-1], flush=True)
    table = markdown_table(results)
    figures.mkdir(parents=True, exist_ok=True)
    command = f"KERAS_BACKEND={backend} " * (backend != "tensorflow") + "python -m experiments conformance" + \
        " --core" * args.core + "".join(
        f" --only {shlex.quote(text)}" for text in args.only)
    page = f"# The conformance zoo\n\n{provenance(command)}\n\n{table}"
    write_atomically(figures / "conformance.md", lambda partial: partial.write_text(page))
    wrong = [f"{r['model']} / {r['mode']}" for r in results if not as_expected(r)]
    print(table + f"table: {figures / 'conformance.md'}")
    if wrong:
        print(f"not as expected: {'; '.join(wrong)}", file=sys.stderr)
    return EXIT_FAILED if wrong else 0


#: The options each command writes under: checked before anything runs.
OUTPUT_OPTIONS = {"run": ("out",), "figures": ("out", "figures"), "claims": ("out", "report"),
                  "report": ("out", "report"), "compare": ("figures",), "sweep": ("out",),
                  "phase-diagram": ("out", "figures"), "gallery": ("figures",), "conformance": ("figures",),
                  "preflight": ("figures",)}


#: What a write error leaves, by command (the others write run directories).
KEPT_AFTER_WRITE_ERROR = {"compare": "", "gallery": "", "conformance": "",
                          "sweep": "; finished points are kept, and the sweep resumes where it stopped"}


def write_error_message(args, error: OSError) -> str:
    """One line: the file (or, when the error does not say, the command's output folders),
    the system's reason and what is kept."""
    where = error.filename or " or ".join(str(getattr(args, option)) for option in OUTPUT_OPTIONS.get(args.command, ()))
    kept = KEPT_AFTER_WRITE_ERROR.get(args.command, "; what was written before is kept, and each run.json "
                                                    "says how far its run got")
    return f"could not write {where or 'a file'}: {error.strerror or error}{kept}"


def _out_of_memory(error: Exception) -> bool:
    """NumPy's MemoryError, or TensorFlow's failure to allocate a tensor."""
    tensorflow = sys.modules.get("tensorflow")
    return isinstance(error, MemoryError) or (
        tensorflow is not None and isinstance(error, tensorflow.errors.ResourceExhaustedError))


def check_writable(args) -> None:
    """Every output directory of the command is a directory that takes a file, or can be
    made in one (nothing is created here): exit 2 now, not a traceback after training."""
    for option in OUTPUT_OPTIONS.get(args.command, ()):
        if getattr(args, option) is None:  # an optional output not asked for
            continue
        path, flag = Path(getattr(args, option)), f"--{option}"
        _check_path_parts(path, flag)
        existing = nearest_existing(path)
        if not existing.is_dir():
            raise ConfigError(flag, flag, str(path), f"{existing} is a file; give a directory")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise ConfigError(flag, flag, str(path),
                              f"cannot be written ({error.strerror or error})") from None


def _check_path_parts(path: Path, flag: str) -> None:
    """No part of ``path`` is a name longer than the file system takes, or a symbolic link
    to nothing (dangling, or in a loop): either fails only when the command first writes."""
    for part in (path, *path.parents):
        if len(part.name.encode()) > 255:
            raise ConfigError(flag, flag, str(path), f"has a name of {len(part.name.encode())} bytes; "
                                                     "file systems take at most 255")
        if part.is_symlink() and not part.exists():
            raise ConfigError(flag, flag, str(path), f"{part} is a symbolic link to nothing "
                                                     f"({os.readlink(part)}: missing, or a loop)")


def command_dashboard(args) -> int:
    from experiments.dashboard import UIS, check_served, empty_note, server_command, server_environment
    from experiments.worker import end_with_parent

    command = server_command(args.ui, Path(args.out), args.port)
    port = args.port or UIS[args.ui]
    check_served(Path(args.out), port)
    print(f"serving {Path(args.out).resolve()} in {args.ui} at http://127.0.0.1:{port} (Ctrl-C stops it)",
          flush=True)
    note = empty_note(args.ui, Path(args.out))
    if note is not None:
        print(note, flush=True)
    # its own session: Ctrl-C reaches this process only, which stops the server with SIGTERM
    # (MLflow's workers printed a traceback each on the terminal's SIGINT); the server ends
    # with this process however it ends (its terminal closed, kill -9)
    server = subprocess.Popen(command, env=server_environment(args.ui), start_new_session=True,
                              preexec_fn=end_with_parent)
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        return 0


def command_preflight(args) -> int:
    import keras

    from experiments.config import config_data
    from experiments.models import build_model
    from gradtools.loggers.base import figure_png
    from gradtools.loggers.local import write_atomically
    from gradtools.plots import plot_signal_propagation
    from gradtools.preflight import preflight

    configs = [load_config(name, args.overrides) for name in (args.configs or config_names())]
    width = max(len(config.run_name) for config in configs)
    for config in configs:
        keras.utils.set_random_seed(config.seed)
        x, y = config_data(config)
        model = build_model(config.model, input_shape=x.shape[1:])
        result = preflight(model, x, y, loss=config.training.loss, batch_size=config.training.batch_size,
                           optimizer=_clipping_optimizer(config))
        print(f"{config.run_name:{width}s}  {result.verdict}")
        if args.explain:
            print(f"  {result.explanation}")
        if args.figures:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            path = Path(args.figures) / f"preflight_{config.group}_{config.name}.png"
            figure = plot_signal_propagation(result.signal, f"{config.run_name}: {result.verdict} at initialization")
            write_atomically(path, lambda target, figure=figure: target.write_bytes(figure_png(figure)))
            print(f"  figure: {path}")
    return 0


def _clipping_optimizer(config):
    """The config's optimizer, clipping as its run clips (gradtools.fit's ``clip_value`` and
    ``clip_global_norm`` as Keras's ``clipvalue`` and ``global_clipnorm``; a "suggested"
    threshold is found by training, so not here)."""
    import keras

    keras_config = config.optimizer.keras_config()
    training = config.training
    if training.clip_value is not None:
        keras_config["config"]["clipvalue"] = training.clip_value
    if isinstance(training.clip_global_norm, (int, float)):
        keras_config["config"]["global_clipnorm"] = training.clip_global_norm
    return keras.optimizers.get(keras_config)


def command_config_reference(_args) -> int:
    from experiments.config import config_reference

    print(config_reference(), end="")
    return 0


COMMANDS = {"run": command_run, "list": command_list, "figures": command_figures,
            "compare": command_compare, "claims": command_claims, "report": command_report,
            "sweep": command_sweep, "phase-diagram": command_phase_diagram,
            "gallery": command_gallery, "conformance": command_conformance, "dashboard": command_dashboard,
            "preflight": command_preflight,
            "config-reference": command_config_reference}


def _start_tensorflow(args) -> None:
    """Start TensorFlow, muted (:mod:`gradtools.tf_startup`), for every command but
    ``dashboard``: after the command line is parsed (``--help`` and usage errors skip its 4 s
    start) and each ``--logger`` backend's package is found (a missing extra is said at once)."""
    if args.command == "dashboard":
        return
    for name in getattr(args, "backends", ()):
        require(name, extra=name, feature=f"--logger {name}")
    from gradtools.tf_startup import import_tensorflow_quietly

    # the zoo's MirroredStrategy cases run over two logical CPU devices
    import_tensorflow_quietly(cpu_devices=2 if args.command == "conformance" else 1)


def main(argv: list[str] | None = None, start_tensorflow: bool = False) -> int:
    """The command line; ``start_tensorflow`` is the entry point's (``python -m experiments``):
    a caller that imported TensorFlow itself leaves it off."""
    from gradtools.__main__ import one_line_warnings, printable_anywhere, reader_gone
    from gradtools.history import RunDirectoryError

    printable_anywhere()
    args = build_parser().parse_args(argv)
    one_line_warnings()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        check_writable(args)
        if start_tensorflow:
            _start_tensorflow(args)
        return COMMANDS[args.command](args)
    except (ConfigError, RunDirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MissingExtra, LoggerUnavailable, UnsupportedBackend) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WorkerLost as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError as error:
        if error.filename is not None:  # a pipe the command writes to, not its output
            print(f"error: {write_error_message(args, error)}", file=sys.stderr)
            return EXIT_WRITE_ERROR
        return reader_gone()
    except OSError as error:
        print(f"error: {write_error_message(args, error)}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except Exception as error:
        if not _out_of_memory(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"error: out of memory ({first_line[:200]}): use less data (data.n_samples), smaller "
              "layers or batches; what finished is kept", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as interruption:
        print("interrupted: what finished is kept (each run.json says how far its run got; "
              "sweeps resume where they stopped)", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interruption, Terminated) else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
