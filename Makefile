# Two commands for a fresh machine:
#   make demo   -> create .venv, install afford, generate on the bundled default model
#   make test   -> create .venv, install afford with test extras, run the whole suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel; a bare `torch` resolved by pip would pull a CUDA build
	$(BIN)/pip install -q "torch==2.13.0"

venv: $(BIN)/activate
	$(BIN)/pip install -q -e ".[serve,plot,test,compress]"

demo: venv
	$(BIN)/afford generate "Natalia sold clips to 48 of her friends in April" --max-tokens 64 --draft default

test: venv
	$(BIN)/python -m pytest -x

bench: venv
	$(BIN)/python benchmarks/decode_vs_hf.py

clean:
	rm -rf $(VENV) .pytest_cache
