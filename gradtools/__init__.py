"""gradtools: see, measure and fix vanishing and exploding gradients in Keras 3 models."""

__version__ = "0.1.0"

from gradtools.history import History  # noqa: E402
from gradtools.training import fit  # noqa: E402

__all__ = ["History", "fit", "__version__"]
