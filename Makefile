# Two commands: `make demo` runs the offline digits benchmark (build, merge with every installed
# method, evaluate, one table), `make test` runs every test of the core and of every plugin.
# Both create their own virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch installs first where one is on hand (these machines keep 2.13.0 on disk);
# override with `make test TORCH_SPEC='torch>=2.2'`. The package itself only asks for a range.
TORCH_SPEC ?= torch==2.13.0
PLUGIN_DIRS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" || $(BIN)/pip install --quiet "torch>=2.2"
	$(BIN)/pip install --quiet -e ".[test,parity]" $(foreach d,$(PLUGIN_DIRS),-e "$(d:/=)[test]")
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mk digits bench --out demo-output

test: install
	$(BIN)/python -m pytest tests $(foreach d,$(PLUGIN_DIRS),$(d)tests) -q

clean:
	rm -rf $(VENV) demo-output
