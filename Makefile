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

# Three pytest workers on the 2 cores this is sized for: much of the suite waits on other processes (Ray nodes,
# workers, databases, sleeping jobs), and with two workers the cores stood idle about a sixth of the run.
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --durations=25

bench: $(STAMP)
	$(VENV)/bin/dsq bench

clean:
	rm -rf $(VENV) *.egg-info dsq-demo-curves.png
