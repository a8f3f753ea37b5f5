# ---- tsan-model (issue 3: driver model under ThreadSanitizer) -------------
# Include from the top Makefile, or run: make -f csrc/tests/tsan_model.mk tsan-model
# The product's C (its C API table, capi.c, included) and the driver model, linked
# into one binary: the model reaches the product through that table all the same
# (tsan_model.c hands it over). The model's own files only: csrc/model's Python
# bindings (model_module.c and the binding files it registers) stay out.
TSAN_MODEL_MODEL = csrc/model/driver_model.c csrc/model/model_debug_layer.c csrc/model/model_images.c \
                   csrc/model/model_runner.c csrc/model/model_capi.c
TSAN_MODEL_SRC = csrc/tests/tsan_model.c $(wildcard csrc/sync/*.c) csrc/guard/guard.c csrc/objc/swizzle.c \
                 csrc/objc/forwarder.c csrc/objc/fwd_tramp.c csrc/agx/discovery.c csrc/agx/hook_table.c csrc/agx/lifecycle.c \
                 csrc/python/capi.c $(TSAN_MODEL_MODEL)
TSAN_MODEL_INC = $(patsubst %,-I%,$(filter-out csrc/tests/,$(wildcard csrc/*/)))
TSAN_CC ?= gcc

csrc/tests/tsan_model.bin: $(TSAN_MODEL_SRC) $(wildcard csrc/*/*.h)
	$(TSAN_CC) -std=gnu11 -O1 -g -fsanitize=thread -DAGX_HAVE_OBJC=1 -DAGX_HAVE_FFI=1 -DAGX_CAPI_NO_PYTHON_WAITS $(TSAN_MODEL_INC) \
		$(TSAN_MODEL_SRC) -o $@ -lobjc -lffi -pthread

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
