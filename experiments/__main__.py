import sys

from gradtools.tf_startup import import_tensorflow_quietly

import_tensorflow_quietly()

from experiments.cli import main  # noqa: E402

sys.exit(main())
