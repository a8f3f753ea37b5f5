/* tsan_model.c: the driver-model stress under ThreadSanitizer.
 *   tsan_model.bin MODE [ITERATIONS] [THREADS]
 * All model bugs on, hooks installed, each op in a region (as run_threads
 * does). With MODE=off TSan reports the planted races (the process may then
 * also fault, as the model does); with MODE=global it must report nothing.
 * Built without Python: the native wait below stands in for acquire.c, and
 * the model gets the product's C API table directly (in the Python build
 * agxguard._model imports it from the capsule agxguard._C._capi).
 *   tsan_model.bin table [ROUNDS] [THREADS]
 * stresses the object-to-stream table alone: each thread inserts, reads back
 * and clears its own addresses while the others make shards grow and rehash;
 * a reader that saw a wrong key (or none) counts a failure. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capi.h"
#include "driver_model.h"
#include "guard.h"
#include "model_capi.h"
#include "model_runner.h"
#include "swizzle.h"

static int table_rounds = 20;
static _Atomic long table_failures;

static void *table_worker(void *arg) {
    uintptr_t base = 0x100000000000ull + ((uintptr_t)arg << 32);
    for (int r = 0; r < table_rounds; r++) {
        int n = 500 + 300 * (r % 5);
        for (int i = 0; i < n; i++) agx_swizzle_set_stream((const void *)(base + 16u * (uintptr_t)i), (uint64_t)(r * 100000 + i));
        for (int i = 0; i < n; i++) {
            uint64_t k = 0;
            if (!agx_swizzle_stream_entry((const void *)(base + 16u * (uintptr_t)i), &k) || k != (uint64_t)(r * 100000 + i))
                atomic_fetch_add(&table_failures, 1);
        }
        for (int i = 0; i < n; i += 1 + (r & 1)) agx_swizzle_clear_stream((const void *)(base + 16u * (uintptr_t)i));
    }
    return NULL;
}

static int table_stress(int threads) {
    pthread_t ts[64];
    if (threads > 64) threads = 64;
    for (long t = 0; t < threads; t++) pthread_create(&ts[t], NULL, table_worker, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(ts[t], NULL);
    agx_stream_table_info info;
    agx_swizzle_stream_table(&info);
    printf("table: %d threads x %d rounds, failures %ld, entries %llu, grows %llu, rehashes %llu\n", threads,
           table_rounds, atomic_load(&table_failures), (unsigned long long)info.entries,
           (unsigned long long)info.grows, (unsigned long long)info.rehashes);
    return atomic_load(&table_failures) ? 1 : 0;
}

/* acquire.c's knobs, which capi.c's table points to */
_Atomic int agx_heir_seat_on = 1;
_Atomic int64_t agx_heir_spin_ns;

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
    if (strcmp(mode, "table") == 0) {
        if (argc > 2) table_rounds = atoi(argv[2]);
        return table_stress(argc > 3 ? atoi(argv[3]) : 4);
    }
    char err[256];
    if (agx_model_use_capi(&agx_capi_table, err, sizeof err) < 0) { fprintf(stderr, "%s\n", err); return 2; }
    int m = agx_mode_from_name(mode);
    if (m < 0) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    agx_mode_set(m);
    if (agx_model_init() < 0) { fprintf(stderr, "model init failed\n"); return 2; }
    agx_model_config c = {1, 1, 1, 1, 0, 0};
    agx_model_configure(&c);
    if (agx_model_hook(err, sizeof err) < 0) { fprintf(stderr, "%s\n", err); return 2; }
    agx_run_options o = {argc > 3 ? atoi(argv[3]) : 4, argc > 2 ? atoi(argv[2]) : 50, 1, 1, 4, 64};
    agx_run_result r;
    if (agx_model_run(&o, &r, err, sizeof err) < 0) { fprintf(stderr, "%s\n", err); return 2; }
    printf("mode=%s ops=%llu mismatches=%llu\n", mode, (unsigned long long)r.ops, (unsigned long long)r.mismatches);
    return r.mismatches ? 1 : 0;
}
