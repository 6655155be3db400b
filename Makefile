# The two commands: `make demo` and `make test`. Both install into .venv first when it is missing or
# older than pyproject.toml.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
# pip on this machine warns once per missing mirror folder: drop those lines, keep pip's exit status
QUIET_PIP := { grep -v '^WARNING: Location' || [ $$? = 1 ]; }

.PHONY: install demo test test-fast bench bench-fm10 bench-speed bench-quick fashion-mnist clean

# pip 23's resolver gives up on ray[train,tune] + moto[server]: upgrade pip first.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing raykd into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raykd run -c configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# everyday work: every test that starts no Ray (losses, views, config, errors, ...), about a minute
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray"

# The benchmark suite on Fashion-MNIST (bench/run.py): the 100-class accuracy regime (pairs), the 10-class one,
# speed against the bare loop; docs/benchmarks.md gives each one's time on 2 cores.
bench: $(STAMP) fashion-mnist
	$(BIN)/python bench/run.py --profile full

bench-fm10: $(STAMP) fashion-mnist
	$(BIN)/python bench/run.py --profile fm10

bench-speed: $(STAMP) fashion-mnist
	$(BIN)/python bench/run.py --profile speed

bench-quick: $(STAMP) fashion-mnist
	$(BIN)/python bench/run.py --profile quick

# Fashion-MNIST for the benchmarks: the Debian package ships the IDX files under $(FMNIST).
fashion-mnist:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then echo "fashion-mnist: already in $(FMNIST)"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
