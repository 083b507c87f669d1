"""The experiments' data: the adding problem's construction, standardization, and the checks
a [data] section gets."""

import functools

import numpy as np
import pytest
from sklearn.datasets import make_moons

from experiments.config import DataSection
from experiments.datasets import check_data_params, make_adding_problem, make_dataset


def test_the_adding_problem_marks_two_steps_and_sums_their_values():
    x, y = make_adding_problem(n_samples=4000, sequence_length=50, random_state=0)
    assert x.shape == (4000, 50, 2) and y.shape == (4000,)
    markers = x[:, :, 1]
    assert (markers.sum(axis=1) == 2).all()
    first = markers.argmax(axis=1)
    second = 49 - markers[:, ::-1].argmax(axis=1)
    assert (first < 5).all() and (second >= 25).all(), "one in the first 10 %, one in the second half"
    rows = np.arange(4000)
    np.testing.assert_allclose(y, x[rows, first, 0] + x[rows, second, 0], rtol=1e-6)
    # predicting the mean scores 1/6, the variance of a sum of two U(0, 1)
    assert abs(np.mean((y - y.mean()) ** 2) - 1 / 6) < 0.01


@pytest.mark.parametrize("arguments, message", [
    ({"n_samples": 0}, "n_samples"), ({"sequence_length": 3}, "sequence_length"),
    ({"random_state": "x"}, "random_state"),
])
def test_the_adding_problem_refuses_bad_parameters(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_adding_problem(**arguments)


def test_standardized_inputs_and_targets_have_zero_mean_and_unit_variance():
    data = DataSection(generator="regression", standardize=True, standardize_targets=True,
                       params={"n_samples": 500, "n_features": 3, "noise": 0.1, "random_state": 0})
    x, y = make_dataset(data)
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-4)
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-4
    raw_x, raw_y = make_dataset(DataSection(generator="regression", params=dict(data.params)))
    assert raw_y.std() > 10, "unscaled targets, as in the article's exploding experiments"


def test_data_parameters_are_checked_without_making_the_data(monkeypatch):
    from experiments import datasets

    def never(**params):
        raise AssertionError("the data was made to check its parameters")

    monkeypatch.setitem(datasets.GENERATORS, "moons", functools.wraps(make_moons)(never))
    with pytest.raises(KeyError) as unknown:
        check_data_params("moons", {"n_sample": 10})
    assert unknown.value.args[0] == "n_sample" and "n_samples" in unknown.value.args[1]
    with pytest.raises(ValueError, match="The 'noise' parameter of make_moons must be a float"):
        check_data_params("moons", {"noise": -1.0})
    check_data_params("moons", {"n_samples": 10_000_000, "noise": 0.1})  # accepted, not made


def test_what_only_making_the_data_shows_is_refused_when_it_is_made():
    with pytest.raises(ZeroDivisionError):  # no informative feature, no noise: constant targets
        make_dataset(DataSection(generator="regression", standardize_targets=True,
                                 params={"n_samples": 20, "n_informative": 0, "noise": 0.0}))
    check_data_params("classification", {"n_features": 2, "n_informative": 3})  # each value is fine...
    with pytest.raises(ValueError, match="informative"):  # ...together they are not
        make_dataset(DataSection(generator="classification", params={"n_features": 2, "n_informative": 3}))
