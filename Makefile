# wanflow: two entry points. `make demo` runs the main job on the embedded defaults,
# `make test` runs the test suite. Both create or refresh .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean bench gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch: a torch already in .venv is kept (a CUDA build, say); else the CPU wheel of 2.13.0 these machines
	# keep on disk, first, so that pyproject's range (torch>=2.6) is met and pip pulls no other (see README).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The demo keeps Prefect's local state (its SQLite database, profiles) in ./.prefect unless PREFECT_HOME
# or PREFECT_API_URL say otherwise; the catalog goes to ./.wanflow/catalog.db and the videos to ./outputs.
demo: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} PREFECT_SERVER_ANALYTICS_ENABLED=false \
		$(VENV)/bin/wanflow demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/dit_forward.py
	$(PY) benchmarks/vae_decode.py
	$(PY) benchmarks/storage_stream.py
	$(PY) benchmarks/orchestration.py
	$(PY) benchmarks/context_parallel.py
	$(PY) benchmarks/gpu_step.py
	$(PY) benchmarks/gpu_generate.py --offload_model --t5_cpu
	$(PY) benchmarks/vae_gpu.py

# The wheels benchmarks/gpu_suite.py needs on a GPU machine without a package registry (the list and why:
# benchmarks/gpu_wheels.sh), into run/gpu-wheels/; README's "Performance on a GPU" has the commands there.
gpu-wheels:
	bash benchmarks/gpu_wheels.sh run/gpu-wheels

clean:
	rm -rf $(VENV) outputs .wanflow .prefect .pytest_cache
