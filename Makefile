# Every target sets up .venv on first use, so a fresh clone needs nothing installed beforehand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= vanishing/sigmoid_baseline
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv run-experiment figures gallery conformance compare claims report phase-diagram sweep dashboard test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,experiments,neptune,mlflow,tensorboard,distributed,zoo,jax]'
	touch $(STAMP)

venv: $(STAMP)

run-experiment: $(STAMP)  ## train configs/$(EXP).toml and print its summary
	$(PY) -m experiments run $(EXP) $(ARGS)

figures: $(STAMP)  ## run every experiment config, write figures/<group>_<name>.png
	$(PY) -m experiments figures $(ARGS)

gallery: $(STAMP)  ## diagnose the gallery of real architectures: figures/gallery.md, heatmaps
	$(PY) -m experiments gallery $(ARGS)

conformance: $(STAMP)  ## the conformance zoo: GradientMonitor and gradtools.fit against a GradientTape, figures/conformance.md
	$(PY) -m experiments conformance $(ARGS)

claims: $(STAMP)  ## the 23 claims over 3 seeds: report/claims.md, report/claims.json
	$(PY) -m experiments claims $(ARGS)

report: phase-diagram  ## report/index.html: figures, diagnoses, claims (3 seeds) and the phase diagram
	$(PY) -m experiments report $(ARGS)

phase-diagram: $(STAMP)  ## sweep depth x init scale x activation (resumable), figures/phase_diagram.png
	$(PY) -m experiments phase-diagram

SWEEP ?= depth_init
sweep: $(STAMP)  ## run configs/sweeps/$(SWEEP).toml: runs/sweeps/<name>/sweep.csv (resumable)
	$(PY) -m experiments sweep $(SWEEP) $(ARGS)

compare: $(STAMP)  ## the article's two comparisons from the newest runs (after make figures)
	$(PY) -m experiments compare $(ARGS)

UI ?= tensorboard
dashboard: $(STAMP)  ## UI=mlflow: MLflow on http://127.0.0.1:5000; UI=tensorboard (default): http://127.0.0.1:6006
	$(PY) -m experiments dashboard --ui $(UI) $(ARGS)

# the linter, then two pytest workers, a test file each at a time (files share module-scoped
# runs; the files that train the claims' nets go to one worker: tests/conftest.py)
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)  ## per-epoch time (eager loop, model.fit, gradtools.fit), make figures, sweep points/min
	$(PY) -m experiments.bench $(ARGS)

clean:
	rm -rf runs figures report .pytest_cache
