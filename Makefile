# Two commands do everything on a fresh machine:
#   make demo   install, then run the main job on embedded data
#   make test   install, then lint and run the test suite
#   make test-fast  the inner loop: the tests not marked slow (under 3 minutes), every module imported
#   make lint   ruff (ruff.toml) on the whole repository
#   make demo-sd  the Stable Diffusion conversion path on tiny random-init models
#   make gpu-smoke  on a GPU machine: both paper configurations a few steps, the speed benchmarks, one table
#                   (benchmarks/gpu_smoke.sh; the device tool's machine: benchmarks/gpu_wheels.sh first)
# Override TORCH to pick another build, e.g. make test TORCH="torch==2.5.1 torchvision==0.20.1".
# TEST_WORKERS: pytest-xdist processes (each runs whole test files); most tests wait on subprocesses,
# so 2 workers keep 2 cores busy. TEST_WORKERS=0 runs the suite in this process.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
# The repository's bytecode is compiled once before the tests: the suite starts about 150 Python processes,
# and with PYTHONDONTWRITEBYTECODE set (as on the CI machine) each would compile these sources again.
SOURCES := infd train data_prep cluster tests benchmarks
STAMP := $(VENV)/.installed

.PHONY: install browser demo demo-sd gpu-smoke test test-fast lint clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	# CompVis's reference encoder/decoder modules, which the conversion tests compare against; without
	# its dependencies (they pin a training stack those two modules do not import).
	$(PY) -m pip install --quiet --no-deps taming-transformers==0.0.1
	touch $(STAMP)

# A headless browser for infd view's test and make demo's screenshots: Debian's chromium, installed with apt
# when running as root (CI); elsewhere the test skips and the demo leaves out its screenshots, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt) for the viewer's browser test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	    echo "could not install chromium with apt: the viewer's browser test will fail, the demo skip its screenshots"; \
	  else echo "no chromium and not root: the viewer's browser test will skip"; fi

demo: install browser
	$(PY) -m train.demo

demo-sd: install
	$(PY) -m train.demo_sd

gpu-smoke: install
	GPU_SMOKE_PY=$(PY) bash benchmarks/gpu_smoke.sh

test: lint browser
	$(PY) -m compileall -q $(SOURCES) > /dev/null
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile -m "not compile" tests

test-fast: install
	$(PY) -m compileall -q $(SOURCES) > /dev/null
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo_out demo_sd_out
