# sm — make setup | make test | make demo
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Where tests and the demo run: directly on hardware KVM, in the test bed otherwise
# (`python` there is this venv's, or the test bed's own).
WHERE := $(PY) -m tests.testbed auto --

# Debian/Ubuntu packages: building guests and images, and the test bed.
APT_PACKAGES := gcc libffi-dev linux-libc-dev busybox-static kmod cpio e2fsprogs erofs-utils \
	acpica-tools gpgv debian-archive-keyring mmdebstrap qemu-system-x86 \
	docker-registry skopeo apache2-utils openssl chromium nodejs

.PHONY: setup system-packages guest-assets test demo clean

setup: system-packages $(VENV)/.installed tests/browser/node_modules/.installed
	@$(PY) -m sm_kernel install --user > /dev/null && echo "setup: kernel \"Python (sm microVM)\" registered (jupyter kernelspec list)"

# playwright-core drives Debian's Chromium in the browser test (tests/browser).
tests/browser/node_modules/.installed: tests/browser/package.json tests/browser/package-lock.json
	@command -v npm > /dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends npm; }
	npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
	@touch $@

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing" $$missing; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py vmm/_build_kvm.py
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $@

# Guest assets are fetched and built on the host, cached in $SM_HOME: the test bed has no
# network and no mmdebstrap.
guest-assets: setup
	$(PY) -m vmm.cli fetch-kernel
	$(PY) -m vmm.cli build-default

# Host side first (the test bed's runner, the browser driving JupyterLab), then the rest
# where guests run.
test: setup guest-assets
	$(PY) -m pytest tests/testbed tests/browser
	$(WHERE) python -m pytest --ignore=tests/testbed --ignore=tests/browser $(PYTEST_ARGS)

# The main job: notebooks/quickstart.ipynb executed on the sm kernel, in a microVM booted
# from the default image; prints every cell's output and the start, snapshot and restore times.
demo: setup guest-assets
	$(WHERE) python -m sm_kernel.demo

clean:
	rm -rf $(VENV) build *.egg-info vmm/_kvm_cffi*.so
