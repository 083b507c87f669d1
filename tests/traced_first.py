"""``python -m experiments ARGS`` in a process that traced other functions first, so that
TensorFlow's own numbering would name the run's program differently
(tests/test_compilation_cache.py)."""

import runpy
import sys

from gradtools.tf_startup import import_tensorflow_quietly

import_tensorflow_quietly()
import tensorflow as tf  # noqa: E402

for k in range(3):
    tf.function(lambda x, k=k: x + k)(tf.constant(1.0))
sys.argv = ["experiments", *sys.argv[1:]]
runpy.run_module("experiments", run_name="__main__", alter_sys=True)
