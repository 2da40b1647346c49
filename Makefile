# Two commands: `make run` (the default pipeline) and `make test` (the fast tier of the tests: everything but the
# end-to-end runs of the real dvc and the model-family matrix, ~4.5 min on 2 cores); `make test-all` runs every
# test (CI), one at a time.
# Each creates .venv and installs the pinned dependencies on first use; an up-to-date
# .venv is detected by a stamp file and skipped.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-all install clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_llamacpp.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" > $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/requirements.txt
	bash scripts/install_llamacpp.sh $(VENV)
	$(BIN)/python -m pip check
	touch $(STAMP)

run: $(STAMP)
	dvc repro

# the fast tier on TEST_WORKERS processes (pytest-xdist): its tests run at 1 thread, so one per core
TEST_WORKERS ?= 2

test: $(STAMP)
	python -m pytest -q -p no:cacheprovider -m "not e2e" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: $(STAMP)
	python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
