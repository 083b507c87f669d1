"""``python -m gradtools``: tools that work on run directories (``diagnose`` and ``compare``
never start TensorFlow), and ``preflight`` for a saved model and a sample of its data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

EXIT_BAD_INPUT = 2
EXIT_WRITE_ERROR = 1


def printable_anywhere() -> None:
    """Standard output and error write what their encoding cannot hold (``×``, ``‖`` under an
    ASCII or Latin-1 locale) as escapes, rather than fail after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def reader_gone() -> int:
    """After a BrokenPipeError on standard output (``| head``): nothing more to say, and
    Python's own flush at exit must not say it either. The exit status is 0: what the
    command did is done."""
    sys.stdout = open(os.devnull, "w")
    return 0


def one_line_warnings() -> None:
    """Warnings on the terminal as ``warning: <message>``, once each, without source lines."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def command_compare(args) -> int:
    from gradtools.compare import compare_runs, figure_path

    _, run_dirs = compare_runs(args.run_dirs, args.stat, args.out)
    print(f"compared {len(run_dirs)} runs on {args.stat}: {figure_path(args.out)}")
    return 0


def command_diagnose(args) -> int:
    from gradtools.diagnosis import diagnose

    diagnosis = diagnose(args.run_dir)
    if args.json:
        print(diagnosis.to_json())
        return 0
    print(diagnosis)
    table = diagnosis.layer_table()[["layer", "path", "block", "verdict", "sensitivity_first_epoch",
                                     "depth_ratio_first_epoch", "update_ratio", "grad_to_weight"]]
    print("\nper layer (sensitivity ‖g‖·‖W‖/|loss| and its ratio to the strongest block after it, "
          "first epoch; largest epoch medians of ‖ΔW‖/‖W‖ and ‖g‖/‖W‖):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


class PreflightInputError(ValueError):
    """A model or data file preflight cannot use; the message names the file and why."""


def _preflight_inputs(args):
    """The saved model and the arrays ``x``, ``y`` of the ``.npz`` file."""
    import numpy as np

    for path, what in ((args.model, "a saved Keras model (.keras)"), (args.data, "a NumPy .npz file")):
        if not os.path.isfile(path):
            raise PreflightInputError(f"{path}: no such file; give {what}")
    try:
        with np.load(args.data) as arrays:
            missing = [key for key in (args.x_key, args.y_key) if key not in arrays.files]
            if missing:
                raise PreflightInputError(f"{args.data}: no array named {missing[0]!r} (it holds "
                                          f"{', '.join(arrays.files) or 'none'}); name them with --x-key and --y-key")
            x, y = arrays[args.x_key], arrays[args.y_key]
    except (OSError, ValueError) as error:
        if isinstance(error, PreflightInputError):
            raise
        raise PreflightInputError(f"{args.data}: not a NumPy .npz file ({error})") from None
    import keras

    try:
        model = keras.models.load_model(args.model)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds; the file is what is wrong
        raise PreflightInputError(f"{args.model}: Keras cannot load it as a model ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return model, x, y


def command_preflight(args) -> int:
    from gradtools.tf_startup import import_tensorflow_quietly

    import_tensorflow_quietly()
    from gradtools.backend import require_supported_backend
    from gradtools.preflight import preflight

    require_supported_backend("python -m gradtools preflight")
    model, x, y = _preflight_inputs(args)
    try:
        result = preflight(model, x, y, loss=args.loss, optimizer=args.optimizer, batch_size=args.batch_size,
                           batches=args.batches)
    except ValueError as error:
        raise PreflightInputError(f"{args.model}, {args.data}: {error}") from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=float))
        return 0
    print(result)
    print("\nper block, in depth order (mean square and variance of its output, fraction of saturated and of "
          "dead units, gradient sensitivity ‖g‖·‖W‖/|loss|):")
    print(result.signal.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradtools",
                                     description="Work with gradtools run directories.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="overlay one statistic of several runs in one figure",
        description="Overlay one statistic of several run directories, labelled by experiment and "
        "seed, log scale when the values span two decades. Globs such as 'runs/vanishing/*/*' work, "
        "quoted or not.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or globs")
    compare.add_argument("--stat", default="layer_1/grad_abs_mean",
                         help="a metrics.csv column (default layer_1/grad_abs_mean)")
    compare.add_argument("--out", default="comparison.png",
                         help="figure file, or a directory for DIR/comparison.png (default comparison.png)")
    compare.set_defaults(handler=command_compare)
    diagnose = commands.add_parser(
        "diagnose", help="vanishing, exploding or healthy, with the evidence",
        description="Diagnose one run directory: vanishing, exploding or healthy, for the run and "
        "for each layer (named by path), with the numbers behind the verdict and what usually "
        "helps (rule and thresholds: docs/diagnosis.md).")
    diagnose.add_argument("run_dir", metavar="RUN_DIR")
    diagnose.add_argument("--json", action="store_true",
                          help='print {"verdict", "evidence", "explanation", "remedies", "layers"} as JSON')
    diagnose.set_defaults(handler=command_diagnose)
    check = commands.add_parser(
        "preflight", help="before training: will this model's gradients vanish or explode?",
        description="Forward and backward passes of a saved model on the first batches of a sample of "
        "its data, at its current weights (nothing it holds changes): vanishing, exploding or healthy at "
        "initialization, by the rule of diagnose, and the signal-propagation table per block.")
    check.add_argument("model", metavar="MODEL.keras", help="a model saved with model.save (compiled, or give --loss)")
    check.add_argument("data", metavar="DATA.npz", help="a sample of its data: numpy.savez(path, x=..., y=...)")
    check.add_argument("--x-key", default="x", help="the inputs' array in DATA.npz (default x)")
    check.add_argument("--y-key", default="y", help="the targets' array in DATA.npz (default y)")
    check.add_argument("--loss", help="a Keras loss name (default: the one the model was compiled with)")
    check.add_argument("--optimizer", help="a Keras optimizer name, to measure the first update (default: "
                       "the compiled one; without either, none is measured)")
    check.add_argument("--batch-size", type=int, default=32, help="examples per batch (default 32)")
    check.add_argument("--batches", type=int, default=4, help="how many batches (default 4)")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(handler=command_preflight)
    return parser


def main(argv: list[str] | None = None) -> int:
    printable_anywhere()
    try:
        return _run(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # while Python imports, reads or draws: nothing half-written
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    from gradtools.backend import UnsupportedBackend
    from gradtools.compare import CompareError
    from gradtools.history import RunDirectoryError

    one_line_warnings()
    try:
        return args.handler(args)
    except (CompareError, RunDirectoryError, PreflightInputError, UnsupportedBackend) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (| head): nothing to report
        return reader_gone()
    except OSError as error:  # a file it could not read or write (compare writes its figure)
        where = error.filename or getattr(args, "out", None) or ""
        verb = "could not write " if args.command == "compare" else ""
        print(f"error: {verb}{where + ': ' if where else ''}{error.strerror or error}", file=sys.stderr)
        return EXIT_WRITE_ERROR


if __name__ == "__main__":
    sys.exit(main())
