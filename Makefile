# Every target bootstraps .venv on first use. Override the model, checkpoint and process count
# with MODEL=, CHECKPOINT= and NPROC= (e.g. `make base MODEL=gpt-j CHECKPOINT=/ckpt NPROC=8`), and
# layer a configuration file over luigi.cfg with CONFIG= (e.g. CONFIG=configs/gpt-j-6b.cfg).
PYTHON ?= python3
VENV := .venv
ifdef CONFIG
export LUIGI_CONFIG_PATH := $(abspath $(CONFIG))
endif
PY := $(VENV)/bin/python
LUIGI := $(VENV)/bin/luigi --module tasks

OVERRIDES := $(if $(MODEL),--pipeline-model $(MODEL)) \
             $(if $(CHECKPOINT),--pipeline-checkpoint $(CHECKPOINT)) \
             $(if $(NPROC),--pipeline-nproc-per-node $(NPROC))

# `make moefy`: Corpus -> BaseModel -> ReluModel -> HiddenStates -> ExpertClusters -> Routers -> Moefied
.PHONY: setup base relu moefy compress plan report results status verify gc gc-dry-run test test-chain test-fast bench bench-moe clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

base: setup
	$(LUIGI) BaseModel $(OVERRIDES)

relu: setup
	$(LUIGI) ReluModel $(OVERRIDES)

moefy: setup
	$(LUIGI) Moefied $(OVERRIDES)

# `make compress`: ... -> PruningMasks -> FinalCompressed (and its single-method variants) -> Report
compress: setup
	$(PY) -m tasks.plan --check --target Report $(OVERRIDES)
	$(LUIGI) Report $(OVERRIDES)

# what `make compress` would run: memory on the host and per rank, disk, FLOPs and time (TFLOPS= per GPU)
plan: setup
	$(PY) -m tasks.plan --target Report $(if $(TFLOPS),--tflops $(TFLOPS)) $(OVERRIDES)

report: setup
	$(LUIGI) Report $(OVERRIDES)

# docs/results.md from the current graph's manifests (after make compress)
results: setup
	$(PY) -m tasks.results $(OVERRIDES)

status: setup
	$(PY) -m tasks.status $(OVERRIDES)

# status, rehashing every file of the current graph (not only those changed since last verified)
verify: setup
	$(PY) -m tasks.status --verify $(OVERRIDES)

gc: setup
	$(PY) -m tasks.gc $(OVERRIDES)

gc-dry-run: setup
	$(PY) -m tasks.gc --dry-run $(OVERRIDES)

# everything but the chain tier; CI (.ci/run) runs both
test: setup
	$(PY) -m pytest -q -m "not chain"

# the whole smoke chain (make moefy + make compress) and what runs on copies of its store:
# staleness, crash, corruption and concurrency scenarios
test-chain: setup
	$(PY) -m pytest -q -m chain

# the unit tests: no stage chains, no torchrun (the edit-test loop)
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/noop_rerun.py
	$(PY) bench/int8.py
	$(PY) bench/train_throughput.py
	$(PY) bench/step_costs.py
	$(PY) bench/masks.py

# MoEfication at GPT-J size: sparse FFN vs dense, clustering (at GPT-J size, and against
# k-means-constrained and same-size k-means at gpt-j-tiny size), HDF5 overhead (~7 min)
bench-moe: setup
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(PY) bench/moe_speed.py --threads 1
	$(PY) bench/kmeans_reference.py --no-kmc --no-elki
	$(PY) bench/kmeans_reference.py --rows 1024 --dim 256 --experts 32
	$(PY) bench/hdf5_overhead.py
	$(PY) bench/compressed_speed.py

clean-venv:
	rm -rf $(VENV)
