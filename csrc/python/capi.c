/* capi.c: the table behind the capsule agxguard._C._capi (see capi.h). Pure
 * C, so the static ThreadSanitizer build links it too. */
#include "capi.h"

#include <stdlib.h>

#include "acquire.h"
#include "guard.h"
#include "lock.h"
#include "spin.h"

#ifdef AGX_HAVE_OBJC
#include "discovery.h"
#include "forwarder.h"
#include "hook_table.h"
#include "swizzle.h"

static void (*capi_forwarder_make_redirect(void *(*redirect)(void *self), const char *types, char *why,
                                           size_t whylen))(void) {
    return (void (*)(void))agx_forwarder_make_redirect(redirect, types, why, whylen);
}
#endif

static void capi_region_enter(agx_entry *e, uint64_t key) {
    agx_thread_entries *t = agx_entries();
    agx_entry_enter_native(t, e, agx_entry_mode_in(t), AGX_SITE_REGION, 1, key, NULL);
}

static void capi_region_exit(agx_entry *e) { agx_entry_pop(e); }

static double capi_lock_pair_ns(long n) {
    if (n < 1) return 0.0;
    agx_lock l;
    agx_lock_init(&l, "bench");
    int64_t t0 = agx_now_ns();
    for (long i = 0; i < n; i++) {
        if (!agx_lock_try(&l)) abort(); /* a fresh lock nobody else knows */
        agx_lock_release(&l);
    }
    int64_t t1 = agx_now_ns();
    return (double)(t1 - t0) / (double)n;
}

const agx_capi agx_capi_table = {
    .version = AGX_CAPI_VERSION,
    .size = sizeof(agx_capi),
    .region_enter = capi_region_enter,
    .region_exit = capi_region_exit,
    .region_depth = agx_region_depth,
    .thread_stream = agx_thread_stream,
    .lock_pair_ns = capi_lock_pair_ns,
    .heir_seat_on = &agx_heir_seat_on,
    .heir_spin_ns = &agx_heir_spin_ns,
    .usable_cpus = agx_usable_cpus,
#ifndef AGX_CAPI_NO_PYTHON_WAITS /* the static TSan build links no acquire.c (it needs Python) */
    .region_wait = &agx_region_wait,
    .grace_ns = &agx_grace_ns,
    .claim_on = &agx_claim_on,
    .wait_counts = &agx_wait_counts_now,
#endif
#ifdef AGX_HAVE_OBJC
    .hooks_install = agx_hooks_install,
    .hooks_uninstall = agx_hooks_uninstall,
    .set_driver_provider = agx_discovery_set_provider,
    .swizzle_shape_for = agx_swizzle_shape_for,
    .swizzle_host_abi = agx_swizzle_host_abi,
    .swizzle_set_stream = agx_swizzle_set_stream,
    .swizzle_stream_entry = agx_swizzle_stream_entry,
    .swizzle_clear_stream = agx_swizzle_clear_stream,
    .swizzle_stream_table = agx_swizzle_stream_table,
    .swizzle_shape_count = agx_swizzle_shape_count,
    .swizzle_shape_key = agx_swizzle_shape_key,
    .swizzle_probe_selector = agx_swizzle_probe_selector,
    .swizzle_probe_call = agx_swizzle_probe_call,
    .forwarder_make_redirect = capi_forwarder_make_redirect,
    .swizzle_force_forwarder = agx_swizzle_force_forwarder,
#endif
};
