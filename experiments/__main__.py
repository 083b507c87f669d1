import os
import signal
import sys

#: A Ctrl-C while the suite's modules are imported: a library may turn it into an ImportError
#: ("initialization failed"), which must not read as a missing package.
interrupted: list[int] = []


def _note_interrupt(signum, frame):
    interrupted.append(signum)
    raise KeyboardInterrupt


signal.signal(signal.SIGINT, _note_interrupt)
try:
    from gradtools.extras import MissingExtra, require

    try:
        require("sklearn", extra="experiments", feature="The experiment suite (its datasets)")
    except MissingExtra as error:
        if interrupted:
            raise KeyboardInterrupt from None
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    from experiments.worker import command_threads, limit_threads  # imports no TensorFlow

    limit_threads(command_threads(sys.argv[1:]))

    from experiments.cli import main  # imports no TensorFlow: main starts it when needed

    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main(start_tensorflow=True)  # from here on, main says what a Ctrl-C kept
except KeyboardInterrupt:  # Ctrl-C while Python imports, before main() can say it
    print("interrupted: nothing was run", file=sys.stderr, flush=True)
    # at once: a library interrupted mid-import can still make the interpreter's exit die of
    # the signal (seen 1 time in 8); nothing was run, so nothing is left to close
    os._exit(130)  # EXIT_INTERRUPTED
sys.exit(code)
