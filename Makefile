# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   creates .venv, installs everything, runs the end-to-end demo on the embedded scene
#   make test   creates .venv, installs everything, runs the test suite
# GPU users: install their torch build into .venv first (see README), or set TORCH_INDEX_URL.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/demo
TORCH_INDEX_URL ?=

# glibc's default allocator mmaps every large tensor afresh (millions of page faults): torch on CPU runs
# 2-2.4x slower here without this. Exported to every command below, Dask workers included.
export GLIBC_TUNABLES := glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1
export MPLBACKEND := Agg

.PHONY: install demo test lint bench bench-quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX_URL)" ]; then $(PY) -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX_URL); fi
	$(PY) -m pip install --quiet -c requirements/lock.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

demo: install
	$(VENV)/bin/cmsn-cube demo --out $(OUT)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check cmsn_cube tests benchmarks pipelines
	$(VENV)/bin/ruff format --check cmsn_cube tests benchmarks pipelines
	$(VENV)/bin/mypy cmsn_cube

bench: install
	$(PY) benchmarks/bench_samples.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_selfcheck.py

# every gap-filler on the real stacks of ../shared/data (the yardstick of quality claims)
bench-quality: install
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
