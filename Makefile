# The two commands a new user needs: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench lock clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m dev.run_stack

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

bench: $(STAMP)
	$(BIN)/python -m bench.run

# requirements.lock: the runtime dependencies (and the build backend) pinned with their hashes; the Docker image
# installs exactly these. Rerun after every change to the dependencies in pyproject.toml; it keeps the pins it
# can (delete the file first to take the newest versions). Local wheel folders (PIP_FIND_LINKS) are left out:
# the image downloads from the package index, whose files are the ones whose hashes count. pip-compile resolves
# for the Python that runs it (it has no target-version option); for these dependencies Python 3.11 and the
# image's 3.12 give the same pins.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet 'pip-tools>=7.4'
	env -u PIP_FIND_LINKS CUSTOM_COMPILE_COMMAND='make lock' \
	  $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --all-build-deps \
	    --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
