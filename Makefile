# One entry point. `make run` and `make test` work as the first command on a fresh machine
# with Python 3.11+ and a C compiler: they create .venv and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test build debug asan lint bench bench-ring bench-scale bench-e2e bench-bridge bench-run bench-ceiling bench-abnormal demo e2e clean

# Reinstall when the build inputs change (protos, Cython sources, build configuration).
$(STAMP): pyproject.toml setup.py $(wildcard protos/hvsock/v1/*.proto) $(wildcard ring/*.pyx ring/*.pxd ring/*.h) $(wildcard hvsock_tools/preload/*.c)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

build: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hvsock-host

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy -p hvsock_common -p host_service -p guest_client -p hvsock_tools -p ring

# Debug build of the ring (asserts, CYTHON_TRACE), in place.
debug: $(STAMP)
	HVSOCK_BUILD=debug $(PY) -m pip install --quiet -e . --no-build-isolation --no-deps
	$(PY) -m pytest tests/unit/ring $(PYTEST_ARGS)

# AddressSanitizer + UBSan build of the ring, ring tests run under it, then the release build back.
asan: $(STAMP)
	HVSOCK_BUILD=asan $(PY) -m pip install --quiet -e . --no-build-isolation --no-deps
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(PY) -m pytest -p no:cacheprovider tests/unit/ring tests/property/test_ring_stateful.py $(PYTEST_ARGS); \
	  status=$$?; $(PY) -m pip install --quiet -e . --no-build-isolation --no-deps; exit $$status

bench: bench-ring bench-e2e

bench-ring: $(STAMP)
	$(PY) bench/bench_ring.py $(if $(QUICK),--quick)

# 10,240 connections at once through one host service (QUICK=1: 1,024).
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py $(if $(QUICK),--quick)

# hv sockets end to end (both data paths) vs TCP, Unix sockets and a raw gRPC stream.
bench-e2e: $(STAMP)
	$(PY) bench/bench_e2e.py $(if $(QUICK),--quick) $(if $(ROUNDS),--rounds $(ROUNDS))

# socat through `hvsock run`'s vsock shim vs the same socat over TCP loopback; connect rates.
bench-run: $(STAMP)
	$(PY) bench/bench_run.py $(if $(QUICK),--quick)

# The relay's transport alone (grpcio bidi streams, 64 KiB frames, credit) vs raw gRPC.
bench-ceiling: $(STAMP)
	$(PY) bench/bench_relay_ceiling.py $(if $(QUICK),--quick)

# Throughput through `hvsock bridge` vs a direct hv connection, on both data paths.
bench-bridge: $(STAMP)
	$(PY) bench/bench_bridge.py $(if $(QUICK),--quick)

# 10,000 streams ended abnormally (malformed frames, cancels, deadlines), 100 at a time, against
# one host: the sessions, segments, threads and fds it holds afterwards (QUICK=1: 1,000).
bench-abnormal: $(STAMP)
	$(PY) bench/bench_abnormal_ends.py $(if $(QUICK),--ends 1000)

# A private host service, two VMs in their own processes (shared memory, gRPC relay), echoes.
demo: $(STAMP)
	$(PY) -m hvsock_tools.demo $(if $(BYTES),--bytes $(BYTES))

e2e: $(STAMP)
	HVSOCK_E2E=1 $(PY) -m pytest -m e2e $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info hvsock ring/*.so ring/*.c
