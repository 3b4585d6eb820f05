# The two quick-start commands: `make demo` (install, then run the main job on the built-in tiny
# model) and `make test` (install with the test extras, then run the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel; an unpinned torch would pull a CUDA build of several GB
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/batchv4 run examples/prompts.jsonl -o out/demo --max-tokens 16
	$(VENV)/bin/batchv4 report out/demo

test: install
	# best effort: Debian's chromium for the HTML report tests (they skip where it is missing)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || true
	TRITON_INTERPRET=1 $(PY) -m pytest -q

.PHONY: install demo test
