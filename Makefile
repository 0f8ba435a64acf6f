# modelgate: the two commands a newcomer needs are `make run` and `make test`.
# Both start from a fresh clone with only cargo, python3 and pip installed (on Debian or
# Ubuntu; the set-up adds perf_analyzer's libb64 with apt-get when it is missing).

PYTHON ?= python3
VENV := .venv
# tritonclient (V2 tests) needs protobuf < 7; the TF Serving client's venv holds protobuf 7.
VENV_V2 := .venv-v2
# Triton's perf_analyzer (the binary in tritonclient 2.40.0's wheel, which pins protobuf < 4).
VENV_PERF := .venv-perf
# libtorch comes from this PyPI wheel; it must match tch's pin in Cargo.toml (tch 0.24.0 <-> torch 2.11.0).
TORCH_VERSION := 2.11.0

# Build against the venv's torch (torch-sys reads these); build.rs embeds the rpath.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Deterministic, quiet logs in tests.
export NO_COLOR := 1

MODELS_STAMP := models/mlp/2/model.pt
FIXTURES_STAMP := target/test-models/fixtures.config
# PyTorch 2 packages compile for 30-60 s: rebuilt only when the export command changes.
PT2_FIXTURES_STAMP := target/pt2-models/expected.json
BENCH_MODELS_STAMP := target/bench-models/resnet50/1/model.pt
BENCH_PT2_STAMP := target/bench-pt2/cnn_aotifrozen/1/model.pt2

.PHONY: setup run build test unit-test python-test v2-test perf-analyzer-test export-test deploy-check lint models clean bench bench-images bench-formats bench-residency bench-soak gpu-bundle

## setup: create the venvs (torch and the official TF Serving client; the Triton clients; perf_analyzer) and the model repositories
setup: $(VENV)/.installed $(VENV_V2)/.installed $(VENV_PERF)/.installed $(MODELS_STAMP) $(FIXTURES_STAMP) $(PT2_FIXTURES_STAMP)

$(VENV)/.installed: tests/python/requirements.txt tests/python/requirements-nodeps.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install --quiet -r tests/python/requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r tests/python/requirements-nodeps.txt
	touch $@

$(VENV_V2)/.installed: tests/python_v2/requirements.txt Makefile
	$(PYTHON) -m venv $(VENV_V2)
	$(VENV_V2)/bin/pip install --quiet --upgrade pip
	$(VENV_V2)/bin/pip install --quiet -r tests/python_v2/requirements.txt
	touch $@

# perf_analyzer also links Debian's libb64 (libb64-0d), installed here when the binary
# cannot find it (as root, or through sudo where CI runs as a user); ldd shows that.
$(VENV_PERF)/.installed: tests/python_v2/requirements-perf.txt Makefile
	$(PYTHON) -m venv $(VENV_PERF)
	$(VENV_PERF)/bin/pip install --quiet --upgrade pip
	$(VENV_PERF)/bin/pip install --quiet -r tests/python_v2/requirements-perf.txt
	if ldd $(VENV_PERF)/bin/perf_analyzer | grep -q 'libb64.* not found'; then \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d; \
	fi
	touch $@

$(MODELS_STAMP): models/generate.py models/warmup.py tools/modelgate_export.py $(VENV)/.installed
	$(VENV)/bin/python models/generate.py demo models
	$(VENV)/bin/python models/warmup.py demo models

$(FIXTURES_STAMP): models/generate.py $(VENV)/.installed
	$(VENV)/bin/python models/generate.py fixtures target/test-models

$(PT2_FIXTURES_STAMP): models/pt2_fixtures.py tools/modelgate_export.py $(VENV)/.installed
	$(VENV)/bin/python models/pt2_fixtures.py target/pt2-models

# make bench's format comparison: mlp and a CNN as TorchScript and AOTInductor packages.
$(BENCH_PT2_STAMP): models/bench_pt2.py tools/modelgate_export.py $(VENV)/.installed
	$(VENV)/bin/python models/bench_pt2.py export target/bench-pt2

# make bench's image models (a 100 MB ResNet-50 among them): not needed by the tests.
$(BENCH_MODELS_STAMP): models/generate.py $(VENV)/.installed
	$(VENV)/bin/python models/generate.py bench target/bench-models

models: $(MODELS_STAMP) $(FIXTURES_STAMP) $(PT2_FIXTURES_STAMP)

## run: serve the demo repository (gRPC on 8500, REST on 8501)
run: setup
	cargo build --release
	./target/release/modelgate --model_config_file=models/models.config

build: setup
	cargo build --release

## test: formatting, lints, Rust unit and integration tests, official-client tests (TF Serving and Triton), perf_analyzer
test: setup lint unit-test python-test v2-test perf-analyzer-test export-test deploy-check

lint: $(VENV)/.installed
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	bash -n benches/gpu/run.sh
	$(VENV)/bin/python -m py_compile benches/gpu/check.py benches/gpu/host_tier.py models/bench_pt2.py

unit-test:
	cargo test

python-test:
	cargo build
	MODELGATE_BIN=target/debug/modelgate $(VENV)/bin/python -m pytest -q tests/python

v2-test:
	cargo build
	# One pytest per client: tritonclient and kserve cannot share a process.
	MODELGATE_BIN=target/debug/modelgate $(VENV_V2)/bin/python -m pytest -q tests/python_v2/test_tritonclient.py
	MODELGATE_BIN=target/debug/modelgate $(VENV_V2)/bin/python -m pytest -q tests/python_v2/test_kserve.py

## perf-analyzer-test: Triton's perf_analyzer against the server, gRPC and HTTP (about 10 s)
perf-analyzer-test:
	cargo build
	MODELGATE_BIN=target/debug/modelgate $(VENV_PERF)/bin/python -m pytest -q tests/python_v2/test_perf_analyzer.py

## export-test: the export command (tools/modelgate_export.py) to TorchScript, served, and to an AOTInductor package (about a minute: the package compiles)
export-test:
	cargo build
	MODELGATE_BIN=target/debug/modelgate $(VENV)/bin/python -m pytest -q tests/export

## deploy-check: Kubernetes manifests, Dockerfiles and workflows validated offline
deploy-check:
	docker/k8s/validate.sh

clean:
	cargo clean
	rm -rf $(VENV) $(VENV_V2) $(VENV_PERF) models/mlp

## bench: the serving benchmark (five tables, the image ones on a GPU when there is one; not part of `make test`)
bench: setup $(BENCH_MODELS_STAMP) $(BENCH_PT2_STAMP)
	cargo bench --bench serving

## bench-formats: table 6 alone (TorchScript, frozen TorchScript, AOTInductor; served and raw)
bench-formats: setup $(BENCH_PT2_STAMP)
	cargo bench --bench serving -- formats

## bench-residency: table 7 alone (12 models on demand in a budget for 3; an unload-first swap)
bench-residency: setup
	cargo bench --bench serving -- residency

## bench-soak: the server's RSS over 2 x SOAK_MINUTES (default 5) of on-demand churn and version swaps under load
SOAK_MINUTES ?= 5
bench-soak: setup
	cargo bench --bench serving -- soak $(SOAK_MINUTES)

## bench-images: tables 4 and 5 alone (ResNet-50 served vs raw; host CPU per image)
bench-images: setup $(BENCH_MODELS_STAMP)
	cargo bench --bench serving -- images

## gpu-bundle: the release server and bench, stripped into .gpu/, for benches/gpu/run.sh on a lent GPU machine
gpu-bundle: setup
	cargo build --release
	cargo bench --bench serving --no-run 2>&1 | tee target/bench-build.log
	mkdir -p .gpu
	strip -o .gpu/modelgate target/release/modelgate
	strip -o .gpu/serving $$(sed -n 's/.*Executable.*(\(.*\))$$/\1/p' target/bench-build.log | tail -1)
	echo $(CURDIR) > .gpu/root
	du -sh .gpu/*
