# Two entry points on a fresh machine: `make run` (quick start) and `make test` (the suite).
PYTHON ?= python3
# The PyTorch build this project is developed and tested with; override for another platform,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install run test bench

install:
	$(PYTHON) -m pip install -q $(TORCH_SPEC)
	$(PYTHON) -m pip install -q -e '.[test,plot]' $(foreach p,$(PLUGINS),-e $(dir $(p)))

run: install
	lsm run recipes/quickstart.toml

test: install
	$(PYTHON) -m pytest -q tests $(foreach p,$(PLUGINS),$(dir $(p))tests)

bench: install
	$(PYTHON) bench/step_cost.py
