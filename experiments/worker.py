"""Entry points of worker processes. This module imports nothing heavy at the top, so a
spawned worker starts TensorFlow quietly (``start``) before anything else imports it."""

from __future__ import annotations


def start() -> None:
    from gradtools.tf_startup import import_tensorflow_quietly

    import_tensorflow_quietly()


def run_job(job: tuple[str, list[str], str]) -> str:
    """Run one (config reference, overrides, out) job; return its run directory."""
    from experiments.config import load_config
    from experiments.runner import run_experiment

    reference, overrides, out = job
    return str(run_experiment(load_config(reference, overrides), out).run_dir)


def run_sweep_point(config) -> dict:
    """Run one sweep point in a temporary directory; return its sweep.csv row and its run
    directory's files (name -> bytes), for the caller to write wherever the sweep lives.
    An error is returned as a failed row, never raised: one bad point must not stop a sweep."""
    import tempfile
    import traceback
    from pathlib import Path

    start()
    from experiments.runner import run_experiment
    from experiments.sweep import summarize_point

    with tempfile.TemporaryDirectory(prefix="gradtools-point-") as scratch:
        run_dir = Path(scratch) / "run"
        failure = None
        try:
            row = summarize_point(run_experiment(config, run_dir=run_dir).history)
        except Exception as error:  # noqa: BLE001 — recorded in sweep.csv, with its traceback
            row = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            failure = traceback.format_exc()
        files = {str(p.relative_to(run_dir)): p.read_bytes()
                 for p in sorted(run_dir.rglob("*")) if p.is_file()} if run_dir.exists() else {}
    if failure is not None:
        files["traceback.txt"] = failure.encode()
    # A worker runs many points: drop each point's models and compiled functions, or the
    # process grows by tens of MB per point.
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()
    return {"row": row, "files": files}
