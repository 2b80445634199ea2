# Two targets do the whole set-up on a fresh machine:
#   make demo   create .venv, install synth7t, build a demo BIDS dataset from shipped data, run it
#   make test   create .venv, install synth7t with test extras, run the test suite
#   make image  build the container image (scripts/build_image.sh)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
export NIPYPE_NO_ET := 1
export TEMPLATEFLOW_AUTOUPDATE := 0

.PHONY: install install-test demo test test-fast image clean

$(VENV)/.installed: setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) --test
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) scripts/make_demo.py $(DEMO_DIR)/bids
	$(VENV)/bin/synth7t $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives participant \
	    -w $(DEMO_DIR)/work --nprocs 2 --omp-nthreads 2
	@echo "Derivatives: $(DEMO_DIR)/derivatives   Reports: $$(ls $(DEMO_DIR)/derivatives/sub-*.html 2>/dev/null | tr '\n' ' ')"

# two pytest-xdist workers, whole groups each (tests/conftest.py: HEAVY_GROUPS); WORKERS=0: serial
WORKERS ?= 2
test: install-test
	$(PY) -m pytest tests -v --durations=40 -n $(WORKERS) --dist loadgroup --no-loadscope-reorder

test-fast: install-test
	$(PY) -m pytest tests -m "not slow and not slurm and not browser" -q

# the container image synth7t:<version> (podman or docker; see scripts/build_image.sh --help)
image:
	bash scripts/build_image.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR)
