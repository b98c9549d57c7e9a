# wanflow: two entry points. `make demo` runs the main job on the embedded defaults,
# `make test` runs the test suite. Both create or refresh .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean bench gpu-wheels

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch: a torch already in .venv is kept (a CUDA build, say); else the CPU wheel of 2.13.0 these machines
	# keep on disk, first, so that pyproject's range (torch>=2.6) is met and pip pulls no other (see README).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	# open_clip, the reference of the CLIP-score parity test (tests/clip_reference.py), in a folder of its own
	# off the venv's path: its torchvision is PyPI's build for CUDA torch, whose import fails on the CPU torch
	# and, if importable, would be imported by transformers everywhere. Only that test's subprocess loads it.
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/openclip-site \
		"open-clip-torch==3.3.0" "timm==1.0.31" "torchvision==0.28.0"
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
	$(PY) benchmarks/duplicates.py
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
