# Developer targets. `make test` is the test command README.md gives (and .ci/run calls).
PYTHON ?= python3
CC ?= gcc
# Every C folder but csrc/tests is an include directory (as setup.py has it).
CSRC_INC = $(patsubst %,-I%,$(filter-out csrc/tests/,$(wildcard csrc/*/)))

.PHONY: build test tsan bench story clean clock-cost macos-check
build:
	$(PYTHON) setup.py build_ext --inplace -q

test: build
	$(PYTHON) -m pytest -q tests

# Cross-build for aarch64-macos and x86_64-macos against Apple's headers
# (ziglang), -Wall -Werror, and fail on any symbol macOS does not provide.
macos-check:
	$(PYTHON) scripts/macos_check.py

# The lock primitives (csrc/sync) and the domains under ThreadSanitizer: must report nothing.
SYNC_SRC = $(wildcard csrc/sync/*.c)
SYNC_HDR = $(wildcard csrc/sync/*.h)
csrc/tests/stress_locks.bin: csrc/tests/stress_locks.c $(SYNC_SRC) $(SYNC_HDR) csrc/guard/guard.c csrc/guard/guard.h
	$(CC) -std=gnu11 -O1 -g -fsanitize=thread $(CSRC_INC) csrc/tests/stress_locks.c $(SYNC_SRC) csrc/guard/guard.c -o $@ -pthread

# The same with the mutex/condvar sleep that macOS uses (Linux uses a futex).
csrc/tests/stress_locks_portable.bin: csrc/tests/stress_locks.c $(SYNC_SRC) $(SYNC_HDR) csrc/guard/guard.c csrc/guard/guard.h
	$(CC) -std=gnu11 -O1 -g -fsanitize=thread -DAGX_LOCK_PORTABLE $(CSRC_INC) csrc/tests/stress_locks.c $(SYNC_SRC) csrc/guard/guard.c -o $@ -pthread

tsan: csrc/tests/stress_locks.bin csrc/tests/stress_locks_portable.bin
	TSAN_OPTIONS="halt_on_error=1 exitcode=66" ./csrc/tests/stress_locks.bin 8 2000
	TSAN_OPTIONS="halt_on_error=1 exitcode=66" ./csrc/tests/stress_locks_portable.bin 8 2000

bench: build
	$(PYTHON) benchmarks/overhead.py
	$(PYTHON) benchmarks/efficiency.py --quick

story: build
	$(PYTHON) -m agxguard.lab story --mode all

clean:
	rm -rf build agxguard/*.so csrc/tests/*.bin

include csrc/tests/tsan_model.mk

# What the uncontended lock path costs, piece by piece, on this machine.
clock-cost: benchmarks/clock_cost.c $(SYNC_SRC) $(SYNC_HDR)
	$(CC) -std=gnu11 -O2 $(CSRC_INC) benchmarks/clock_cost.c $(SYNC_SRC) -o csrc/tests/clock_cost.bin -pthread
	./csrc/tests/clock_cost.bin
