# dsq: `make demo` runs the embedded end-to-end job, `make test` the whole suite.
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsq demo

# Two pytest workers: much of the suite waits on other processes (Ray nodes, workers, databases), so two share
# the 2 cores this is sized for better than one. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --durations=25

bench: $(STAMP)
	$(VENV)/bin/dsq bench

clean:
	rm -rf $(VENV) *.egg-info dsq-demo-curves.png
