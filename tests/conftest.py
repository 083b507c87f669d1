import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The suite compiles many programs more than once (in workers, subprocesses, repeated runs):
# one persistent XLA cache for it, inside the checkout, before TensorFlow starts.
os.environ.setdefault("GRADTOOLS_XLA_CACHE", str(REPO_ROOT / ".pytest_cache" / "xla"))
sys.path.insert(0, str(REPO_ROOT))
from experiments.worker import limit_threads, threads_per_worker  # noqa: E402 (imports no TensorFlow)
from gradtools.compilation_cache import enable  # noqa: E402
from gradtools.tf_startup import collect_garbage_less_often, freeze_what_exists  # noqa: E402

enable()
# As in the suite's own processes (gradtools.tf_startup): the collector runs less often, and
# once the test modules are imported (TensorFlow, Keras), no longer looks through them.
collect_garbage_less_often()
# pytest-xdist's workers share the cores: each gets its share of TensorFlow's threads (and so
# do the commands it starts), as the experiments' own worker processes do.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    limit_threads(threads_per_worker(int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def pytest_collection_finish(session):
    freeze_what_exists()


def jax_env() -> dict:
    """The environment of a subprocess that runs Keras on JAX and imports this checkout's code."""
    import jax  # noqa: F401 - the jax extra (make installs it): without it Keras cannot start on JAX

    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO_ROOT)}


def run_cli(args, cwd, timeout=300, env=None, module="experiments", **kwargs):
    """``python -m experiments ...`` (or another ``module``) in a subprocess that imports this
    checkout's code."""
    import subprocess

    env = {**(env or os.environ), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_cli(args, cwd, module="experiments", preexec_fn=None, **kwargs):
    """``python -m experiments ...`` started in the background, as a terminal's foreground
    process: Ctrl-C (SIGINT) reaches it even when the suite itself was started by a shell in
    the background, whose children inherit SIGINT ignored."""
    import signal
    import subprocess

    def prepare():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, preexec_fn=prepare,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def exploding_relu_setup(seed=0, n=64, features=4):
    """Large ReLU weights (uniform in [4, 5]) regressing targets of scale ~400: diverges under
    SGD(0.01) within a few steps, like the article's exploding baseline."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x.sum(axis=1) * 200).astype(np.float32)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((features,)),
                              keras.layers.Dense(8, activation="relu",
                                                 kernel_initializer=keras.initializers.RandomUniform(4, 5)),
                              keras.layers.Dense(1)])
    return model, x, y


def assert_drawn_png(path, size_inches=None, dpi=100):
    """A PNG that holds a drawn picture: it decodes, has the figure's size in pixels when
    ``size_inches`` is given, and is not one flat colour."""
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(path)
    if size_inches is not None:
        width, height = size_inches
        assert pixels.shape[:2] == (round(height * dpi), round(width * dpi)), pixels.shape
    assert np.ptp(pixels[..., :3]) > 0.5, f"{path} is blank"
    return pixels


#: Test files that train the same nets on the same data (the claims' experiments): one worker
#: runs them one after the other, and the later ones reuse the compiled programs.
SAME_NETS = {"test_article", "test_recurrent_and_remedies", "test_report"}


#: The longest work units, longest first (measured on 2 cores with cold caches: about 120, 75,
#: 45, 32, 30, 26, 21, 18 and 18 s); the others follow in pytest-xdist's order.
LONGEST_FIRST = ("same nets", "test_faults", "test_sweep", "test_gallery", "test_cli", "test_mlflow_logger",
                 "test_fit", "test_compilation_cache", "test_extras")


def _rank(scope: str, order: tuple[str, ...]) -> int:
    name = Path(scope).stem if scope.endswith(".py") else scope
    return order.index(name) if name in order else len(order)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist, never called
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadfile``, each test file goes whole to one worker (module-scoped runs
    are made once), and so do the files of ``SAME_NETS`` together. (pytest-xdist's own
    ``loadgroup`` cannot do it with pytest 9: it renames tests through an attribute pytest 9
    no longer reads, and then spreads them one by one.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SameNetsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return "same nets" if Path(path).stem in SAME_NETS else path

        def _assign_work_unit(self, node):
            """The longest unit left first (LONGEST_FIRST), so that no long file is left to
            run alone at the end while the other worker has nothing to do."""
            first = min(self.workqueue, key=lambda scope: _rank(scope, LONGEST_FIRST))
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return SameNetsTogether(config, log)


@pytest.fixture
def repo_root():
    return REPO_ROOT


def spiky_fit(loggers, batch=16, batches=24, bad=20):
    """``gradtools.fit`` of a small ReLU regressor (not compiled with XLA, for speed) whose
    batch ``bad`` (0-based, one epoch, no shuffling) has its targets multiplied by 10³, with
    ``SpikeGuard("skip")`` and ``loggers``; the History."""
    import keras
    import numpy as np

    import gradtools

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * batches, 4)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    y[bad * batch:(bad + 1) * batch] *= 1e3
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    return gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01), epochs=1, batch_size=batch,
                         shuffle=False, jit_compile=False, loggers=loggers, figures=False,
                         spike_guard=gradtools.SpikeGuard("skip", verbose=False))
