"""The conformance zoo's core on Keras's JAX backend, against jax.grad (a process of its own:
Keras fixes its backend when it is imported). Apart from tests/test_backends.py so that the
two can run on the suite's two workers at once."""


from conftest import jax_env, run_cli


def test_the_core_of_the_zoo_on_jax_is_recorded_exactly_against_jax_grad(repo_root, tmp_path):
    """``KERAS_BACKEND=jax python -m experiments conformance --core``: every core case's records
    equal jax.grad's of model.compute_loss at the same weights (the smaller last batch, an
    embedding, logits far out, GPT-2's padding mask); the MirroredStrategy case is left out,
    saying why."""
    done = run_cli(["conformance", "--core", "--figures", str(tmp_path)], repo_root, env=jax_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left out on jax: friedman regressor / MirroredStrategy ×2, uneven last batch (a tf.distribute " \
           "strategy: TensorFlow only)" in done.stdout
    page = (tmp_path / "conformance.md").read_text()
    assert "KERAS_BACKEND=jax python -m experiments conformance --core" in page
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 5, page
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2].startswith("exact (") and cells[3] == "—" and cells[4].endswith("3"), row
