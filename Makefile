# Two commands do everything on a fresh machine:
#   make demo   install, then run the main job on embedded data
#   make test   install, then run the test suite
# Override TORCH to pick another build, e.g. make test TORCH="torch==2.5.1 torchvision==0.20.1".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m train.demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo_out
