# Two commands from a fresh clone: `make demo` and `make test`. Everything else is set-up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= 2.13.0
STAMP   := $(VENV)/.installed
CONSTRAINT := $(VENV)/torch-constraint.txt

.PHONY: demo test venv lint proto bench clean

demo: $(STAMP)
	$(BIN)/ringmaster demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

venv: $(STAMP)

# Torch goes in first: a CPU wheel here unless a CUDA torch is already present; then the
# project under a constraint that pins whatever torch is installed, so no dependency can
# swap in a multi-GB CUDA build behind our back.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
	  || $(BIN)/python -m pip install -q "torch==$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINT)
	$(BIN)/python -m pip install -q -c $(CONSTRAINT) -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
	  controller/rpc/ringmaster.proto

bench: $(STAMP)
	$(BIN)/python -m bench.planner

clean:
	rm -rf $(VENV) demo-out .pytest_cache
