/* capi.h: what agxguard._C offers the modules built apart from it.
 *
 * agxguard._model (csrc/model: the driver model, its runner and the lab's
 * fixtures) needs a few of the product's internals: a region entered from a
 * native thread, the hook set installed on a driver, a receiver's stream key,
 * the cost of one lock. It links none of them. _C exports one table of
 * function pointers, agx_capi_table, as the capsule `agxguard._C._capi`, and
 * _model imports it at init (PyCapsule_Import, as CPython's datetime module
 * hands out its C API) and calls the product only through it. The static
 * ThreadSanitizer build (csrc/tests/tsan_model.c), which links everything
 * into one binary, passes &agx_capi_table to the model directly.
 *
 * Inverted dependencies: where the product needs the model (discovery of the
 * "model" driver: its device, its stand-in for dyld's image loads), the
 * product offers a registration point, set_driver_provider, and the model
 * registers itself there. The product includes nothing from csrc/model.
 *
 * Versioning: a consumer checks `version` == AGX_CAPI_VERSION and `size` >=
 * the size it was built with; bump the version when an entry changes its
 * meaning or signature, append new entries at the end. Entries of the
 * Objective-C part are NULL in a build without a runtime.
 *
 * Pure C (no Python): the capsule itself is made in module.c. */
#ifndef AGX_CAPI_H
#define AGX_CAPI_H

#include <stddef.h>
#include <stdint.h>

#include "guard.h"

#define AGX_CAPI_NAME "agxguard._C._capi"
#define AGX_CAPI_VERSION 1

struct agx_driver_provider;   /* discovery.h */
struct agx_stream_table_info; /* swizzle.h */

typedef struct agx_capi {
    int version;  /* AGX_CAPI_VERSION */
    size_t size;  /* sizeof(agx_capi) of the product */

    /* ---- regions and streams (guard.h) */
    /* Open a region on the calling native thread as guard(stream=key) does
     * (the nesting rule, the mode's lock, a native wait); close it with
     * region_exit, LIFO per thread. */
    void (*region_enter)(agx_entry *e, uint64_t key);
    void (*region_exit)(agx_entry *e);
    /* How many guarded regions (Guard objects) the calling thread is inside. */
    int (*region_depth)(void);
    /* The calling thread's use_stream() key: 1 and *key when set, else 0. */
    int (*thread_stream)(uint64_t *key);

    /* ---- the lock core, for measurements (lock.h) */
    /* Nanoseconds per uncontended try + release of a fresh lock, `n` times
     * in a loop (the product's inline fast path, not a call per step). */
    double (*lock_pair_ns)(long n);
    /* The heir seat switch and its spin (lock.c), read by every wait. */
    _Atomic int *heir_seat_on;
    _Atomic int64_t *heir_spin_ns;
    /* CPUs the calling thread may use (what waits spin against). */
    int (*usable_cpus)(void);

    /* ---- the Objective-C part: NULL without a runtime */
    /* hook_table.h: install the AGX hook set on `driver` (discovery.h's
     * AGX_DRIVER_*), remove it. */
    int (*hooks_install)(int driver, char *err, size_t errlen);
    int (*hooks_uninstall)(void);
    /* discovery.h: register the provider of a driver that is not the
     * system's (the driver model); 0, or -1 for a driver that takes none. */
    int (*set_driver_provider)(int driver, const struct agx_driver_provider *p);
    /* swizzle.h: shapes, streams, the shape self-check. */
    const char *(*swizzle_shape_for)(const char *types, char *err, size_t errlen);
    const char *(*swizzle_host_abi)(void);
    int (*swizzle_set_stream)(const void *object, uint64_t key);
    int (*swizzle_stream_entry)(const void *object, uint64_t *key);
    void (*swizzle_clear_stream)(const void *object);
    void (*swizzle_stream_table)(struct agx_stream_table_info *out);
    size_t (*swizzle_shape_count)(void);
    const char *(*swizzle_shape_key)(size_t i);
    const char *(*swizzle_probe_selector)(size_t i);
    int (*swizzle_probe_call)(size_t i, char *err, size_t errlen);
    /* forwarder.h (issue 13): a wrapper layer's closure for a shape with no
     * typed forwarder (returns the IMP, NULL with why); and the test switch
     * that sends new hooks through the general forwarder. */
    void (*(*forwarder_make_redirect)(void *(*redirect)(void *self), const char *types, char *why,
                                      size_t whylen))(void);
    void (*swizzle_force_forwarder)(int on);
    /* ---- how Python waiters wait (acquire.h), for measurements: the wait
     * ('watch', 'grace', 'direct'), the grace period, the op lock's claim, and
     * the tallies of GIL trips. NULL in the static TSan build (no acquire.c). */
    _Atomic int *region_wait;
    _Atomic int64_t *grace_ns;
    _Atomic int *claim_on;
    struct agx_wait_counts *wait_counts;
} agx_capi;

/* The product's table (capi.c). */
extern const agx_capi agx_capi_table;

#endif
