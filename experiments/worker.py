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
