import sys

from gradtools.extras import MissingExtra, require
from gradtools.tf_startup import import_tensorflow_quietly

try:
    require("sklearn", extra="experiments", feature="The experiment suite (its datasets)")
except MissingExtra as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

from experiments.worker import command_threads, limit_threads  # noqa: E402 (imports no TensorFlow)


def _needs_tensorflow(arguments: list[str]) -> bool:
    """Every command but ``dashboard`` and ``--help`` (which read no config) starts
    TensorFlow first, with its start-up chatter muted: about 4 s they can skip."""
    command = next((a for a in arguments if not a.startswith("-")), None)
    return command != "dashboard" and not {"-h", "--help"} & set(arguments)


limit_threads(command_threads(sys.argv[1:]))
if _needs_tensorflow(sys.argv[1:]):
    import_tensorflow_quietly()

from experiments.cli import main  # noqa: E402

sys.exit(main())
