# wanflow: two entry points. `make demo` runs the main job on the embedded defaults,
# `make test` runs the test suite. Both create or refresh .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel already on these machines (see README).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m wan.generate --task tiny-t2v --size 64*48 --frame_num 9 --sample_steps 8 \
		--prompt "a red fox runs through fresh snow at dawn" --base_seed 42 --save_file outputs/demo.mp4

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/dit_forward.py
	$(PY) benchmarks/vae_decode.py
	$(PY) benchmarks/storage_stream.py

clean:
	rm -rf $(VENV) outputs .wanflow .pytest_cache
