/* tsan_model.c: the driver-model stress under ThreadSanitizer.
 *   tsan_model.bin MODE [ITERATIONS] [THREADS]
 * All model bugs on, hooks installed, each op in a region (as run_threads
 * does). With MODE=off TSan reports the planted races (the process may then
 * also fault, as the model does); with MODE=global it must report nothing.
 * Built without Python: the native wait below stands in for acquire.c. */
#include <stdio.h>
#include <stdlib.h>

#include "guard.h"
#include "objc/driver_model.h"
#include "objc/model_runner.h"

void agx_acquire_native(agx_lock *l) {
    if (!agx_lock_try(l)) {
        int64_t t0 = agx_now_ns();
        agx_lock_wait_until(l, -1);
        agx_lock_note_wait(l, agx_now_ns() - t0);
    }
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "off";
    agx_guard_init();
    int m = agx_mode_from_name(mode);
    if (m < 0) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    agx_mode_set(m);
    if (agx_model_init() < 0) { fprintf(stderr, "model init failed\n"); return 2; }
    agx_model_config c = {1, 1, 1, 1, 0, 0};
    agx_model_configure(&c);
    char err[256];
    if (agx_model_hook(err, sizeof err) < 0) { fprintf(stderr, "%s\n", err); return 2; }
    agx_run_options o = {argc > 3 ? atoi(argv[3]) : 4, argc > 2 ? atoi(argv[2]) : 50, 1, 1, 4, 64};
    agx_run_result r;
    if (agx_model_run(&o, &r, err, sizeof err) < 0) { fprintf(stderr, "%s\n", err); return 2; }
    printf("mode=%s ops=%llu mismatches=%llu\n", mode, (unsigned long long)r.ops, (unsigned long long)r.mismatches);
    return r.mismatches ? 1 : 0;
}
