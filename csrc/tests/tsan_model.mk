# ---- tsan-model (issue 3: driver model under ThreadSanitizer) -------------
# Include from the top Makefile, or run: make -f csrc/tests/tsan_model.mk tsan-model
TSAN_MODEL_SRC = csrc/tests/tsan_model.c csrc/lock.c csrc/guard.c csrc/objc/swizzle.c \
                 csrc/objc/driver_model.c csrc/objc/model_runner.c csrc/objc/discovery.c \
                 csrc/objc/hook_table.c csrc/objc/lifecycle.c csrc/objc/model_images.c \
                 csrc/objc/model_debug_layer.c
TSAN_CC ?= gcc

csrc/tests/tsan_model.bin: $(TSAN_MODEL_SRC) csrc/objc/*.h csrc/*.h
	$(TSAN_CC) -std=gnu11 -O1 -g -fsanitize=thread -Icsrc $(TSAN_MODEL_SRC) -o $@ -lobjc -pthread

.PHONY: tsan-model
tsan-model: csrc/tests/tsan_model.bin
	@echo "== off (expect ThreadSanitizer reports) =="
	-TSAN_OPTIONS="halt_on_error=0 exitcode=66" ./csrc/tests/tsan_model.bin off 30 4
	@echo "== global (expect no reports) =="
	TSAN_OPTIONS="halt_on_error=0 exitcode=66" ./csrc/tests/tsan_model.bin global 30 4
	@echo "== stream, one shared queue (expect no reports: the stream table's lock-free reads) =="
	TSAN_OPTIONS="halt_on_error=0 exitcode=66" ./csrc/tests/tsan_model.bin stream 30 4
	@echo "== the stream table alone: inserts, reads, clears, grows and rehashes at once (expect no reports) =="
	TSAN_OPTIONS="halt_on_error=0 exitcode=66" ./csrc/tests/tsan_model.bin table 20 4
