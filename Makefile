# Task runner. `make run` and `make test` install the package first, so both work
# on a fresh clone; constraints.txt pins torch 2.13.0 and the reference packages (an
# installed torch 2.13.0 build, CPU or CUDA, is kept; see README.md, "Installation").
PYTHON ?= python3

.PHONY: install run test test-threads lint format clean

install:
	$(PYTHON) -m pip install --quiet --root-user-action=ignore -c constraints.txt -e ".[test]"

run: install
	$(PYTHON) -m curvkit report --out results/report

test: install lint
	$(PYTHON) -m pytest

# The quick numerical tests again with 2 torch threads (`make test` uses 1): no
# result may depend on how reductions and decompositions split between threads.
# Left out: the command line, report, plots and scripts (their numbers come from
# the functions tested here; at 2 threads their tiny problems run several times
# slower) and tests/distributed (its workers always run one thread).
THREAD_TESTS = tests/extraction tests/operators tests/optim tests/test_bad_input.py \
	tests/test_estimators.py tests/test_krylov.py tests/test_memory.py tests/test_metrics.py \
	tests/test_spectral.py tests/test_tracking.py

test-threads: install
	CURVKIT_TEST_THREADS=2 $(PYTHON) -m pytest -q -m "not slow" -p no:cacheprovider $(THREAD_TESTS)

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
