import sys

from gradtools.extras import MissingExtra, require

try:
    require("sklearn", extra="experiments", feature="The experiment suite (its datasets)")
except MissingExtra as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

from experiments.worker import command_threads, limit_threads  # noqa: E402 (imports no TensorFlow)

limit_threads(command_threads(sys.argv[1:]))

from experiments.cli import main  # noqa: E402 (imports no TensorFlow: main starts it when needed)

sys.exit(main(start_tensorflow=True))
