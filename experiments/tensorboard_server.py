"""``python -m experiments.tensorboard_server <tensorboard's arguments>``: TensorBoard's server
(its ``program.TensorBoard``) on TensorBoard's own stand-in for TensorFlow.

Reading event files needs no TensorFlow, and not starting it makes the server ready several
times sooner, for a fraction of the CPU. This module imports nothing else of the suite, so the
server starts nothing it does not need.
"""

import sys
import types


def serve_tensorboard(arguments: list[str]) -> int:
    # the switch TensorBoard's build without TensorFlow uses: this module's presence
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
    import absl.logging
    from tensorboard import default, program

    absl.logging.set_verbosity(absl.logging.WARNING)
    server = program.TensorBoard(plugins=default.get_plugins())
    server.configure(argv=[None, *arguments])
    return server.main()


if __name__ == "__main__":
    sys.exit(serve_tensorboard(sys.argv[1:]))
