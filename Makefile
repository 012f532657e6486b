# Task runner. `make run` and `make test` install the package first, so both work
# on a fresh clone; constraints.txt keeps pip on the CPU build of torch.
PYTHON ?= python3

.PHONY: install run test test-threads lint format clean

install:
	$(PYTHON) -m pip install --quiet --root-user-action=ignore -c constraints.txt -e ".[test]"

run: install
	$(PYTHON) -m curvkit report --out results/report

test: install lint
	$(PYTHON) -m pytest

# The quick tests again with 2 torch threads (`make test` uses 1): no test may
# depend on how reductions are split between threads.
test-threads: install
	CURVKIT_TEST_THREADS=2 $(PYTHON) -m pytest -q -m "not slow" -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
