# Every target sets up .venv on first use, so a fresh clone needs nothing installed beforehand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= vanishing/sigmoid_baseline
ARGS ?=
PYTEST_ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv run-experiment figures compare claims report dashboard test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run-experiment: $(STAMP)  ## train configs/$(EXP).toml and print its summary
	$(PY) -m experiments run $(EXP) $(ARGS)

figures: $(STAMP)  ## run all ten experiments, write figures/<group>_<name>.png
	$(PY) -m experiments figures $(ARGS)

claims: $(STAMP)  ## the article's ten claims over 3 seeds: report/claims.md, report/claims.json
	$(PY) -m experiments claims $(ARGS)

report: $(STAMP)  ## report/index.html: figures, diagnoses and claims (3 seeds, 100 epochs)
	$(PY) -m experiments report $(ARGS)

compare: $(STAMP)  ## the article's two comparisons from the newest runs (after make figures)
	$(PY) -m experiments compare $(ARGS)

dashboard: $(STAMP)  ## TensorBoard on http://127.0.0.1:6006 for runs made with --logger tensorboard
	$(PY) -m tensorboard.main --logdir runs --host 127.0.0.1 $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## per-epoch time: article's eager loop vs model.fit vs gradtools.fit
	$(PY) -m experiments.bench $(ARGS)

clean:
	rm -rf runs figures report .pytest_cache
