/* hook_table.c: the AGX hook set (one table) and its installation on the
 * classes discovery found (see hook_table.h). */
#include "hook_table.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "lifecycle.h"
#include "swizzle.h"

#define ROLE(r) (1u << AGX_ROLE_##r)
#define BUFFERS (ROLE(COMMAND_BUFFER) | ROLE(MPS_COMMAND_BUFFER))
#define COMPUTE ROLE(COMPUTE_ENCODER)
#define BLIT ROLE(BLIT_ENCODER)
#define RENDER ROLE(RENDER_ENCODER)
#define PARALLEL ROLE(PARALLEL_RENDER_ENCODER)
#define RSTATE ROLE(RESOURCE_STATE_ENCODER)
#define ACCEL ROLE(ACCEL_STRUCT_ENCODER)
#define ENCODERS (COMPUTE | BLIT | RENDER | PARALLEL | RSTATE | ACCEL)
#define C(sel) {COMPUTE, sel, AGX_KIND_CALL, 0}
#define B(sel) {BLIT, sel, AGX_KIND_CALL, 0}
#define R(sel) {RENDER, sel, AGX_KIND_CALL, 0}

/* Selectors whose shape has no typed wrapper (a q2 range among pointers, two
 * floats, a region among counters, ...) go through the swizzle engine's
 * general forwarder: every row here is installable wherever a class has it. */
const agx_hook_row agx_hook_rows[] = {
    /* command queue: the buffer factories (a buffer's stream is its queue) */
    {ROLE(QUEUE), "commandBuffer", AGX_KIND_MAKE_BUFFER, 0},
    {ROLE(QUEUE), "commandBufferWithUnretainedReferences", AGX_KIND_MAKE_BUFFER, 0},
    /* command buffers: every encoder factory, commit, events */
    {BUFFERS, "computeCommandEncoder", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "computeCommandEncoderWithDescriptor:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "computeCommandEncoderWithDispatchType:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "blitCommandEncoder", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "blitCommandEncoderWithDescriptor:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "renderCommandEncoderWithDescriptor:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "parallelRenderCommandEncoderWithDescriptor:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "resourceStateCommandEncoder", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "resourceStateCommandEncoderWithDescriptor:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "accelerationStructureCommandEncoder", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "accelerationStructureCommandEncoderWithDescriptor:", AGX_KIND_MAKE_ENCODER, 0},
    {BUFFERS, "commit", AGX_KIND_COMMIT, 0},
    {BUFFERS, "encodeSignalEvent:value:", AGX_KIND_CALL, 0},
    {BUFFERS, "encodeWaitForEvent:value:", AGX_KIND_CALL, 0},
    /* a driver's own release frees the buffer's queue slot (the model's
     * does, on its completion thread): counted, never locked; NSObject's is
     * not the driver's and is left alone */
    {ROLE(COMMAND_BUFFER), "release", AGX_KIND_CALL, AGX_ROW_OWN | AGX_ROW_UNLOCKED},
    /* a parallel render encoder makes render sub-encoders (they take its stream) */
    {PARALLEL, "renderCommandEncoder", AGX_KIND_MAKE_ENCODER, 0},
    /* compute encoder: state, bindings, residency, barriers, fences, dispatch */
    C("setComputePipelineState:"),
    C("setBuffer:offset:atIndex:"),
    C("setBuffers:offsets:withRange:"),
    C("setBufferOffset:atIndex:"),
    C("setBuffer:offset:attributeStride:atIndex:"),
    C("setBuffers:offsets:attributeStrides:withRange:"),
    C("setBytes:length:atIndex:"),
    C("setTexture:atIndex:"),
    C("setTextures:withRange:"),
    C("setSamplerState:atIndex:"),
    C("setSamplerStates:withRange:"),
    C("setSamplerState:lodMinClamp:lodMaxClamp:atIndex:"),
    C("setSamplerStates:lodMinClamps:lodMaxClamps:withRange:"),
    C("setThreadgroupMemoryLength:atIndex:"),
    C("setImageblockWidth:height:"),
    C("setStageInRegion:"),
    C("setStageInRegionWithIndirectBuffer:indirectBufferOffset:"),
    C("setFunction:atIndex:"),
    C("setVisibleFunctionTable:atBufferIndex:"),
    C("setVisibleFunctionTables:withBufferRange:"),
    C("setIntersectionFunctionTable:atBufferIndex:"),
    C("setIntersectionFunctionTables:withBufferRange:"),
    C("setAccelerationStructure:atBufferIndex:"),
    C("useResource:usage:"),
    C("useResource:usage:stages:"),
    C("useResources:count:usage:"),
    C("useResources:count:usage:stages:"),
    C("useHeap:"),
    C("useHeap:stages:"),
    C("useHeaps:count:"),
    C("useHeaps:count:stages:"),
    C("memoryBarrierWithScope:"),
    C("memoryBarrierWithScope:afterStages:beforeStages:"),
    C("memoryBarrierWithResources:count:"),
    C("executeCommandsInBuffer:withRange:"),
    C("executeCommandsInBuffer:indirectBuffer:indirectBufferOffset:"),
    C("dispatchThreads:threadsPerThreadgroup:"),
    C("dispatchThreadgroups:threadsPerThreadgroup:"),
    C("dispatchThreadgroupsWithIndirectBuffer:indirectBufferOffset:threadsPerThreadgroup:"),
    C("dispatchThreadsWithIndirectBuffer:indirectBufferOffset:threadsPerThreadgroup:"),
    /* the AGX compute context's own flush and fence entry points */
    C("dispatchWaitFlush"),
    C("dispatchFlushInvalidate"),
    C("dispatchFlushOnly"),
    C("dispatchInvalidateOnly"),
    C("dispatchFenceOnly"),
    /* blit encoder: fill, copies, synchronize, mipmaps, residency hints, command buffers, counters */
    B("fillBuffer:range:value:"),
    B("copyFromBuffer:sourceOffset:toBuffer:destinationOffset:size:"),
    B("copyFromBuffer:sourceOffset:sourceBytesPerRow:sourceBytesPerImage:sourceSize:toTexture:destinationSlice:"
      "destinationLevel:destinationOrigin:"),
    B("copyFromTexture:sourceSlice:sourceLevel:sourceOrigin:sourceSize:toTexture:destinationSlice:"
      "destinationLevel:destinationOrigin:"),
    B("copyFromTexture:sourceSlice:sourceLevel:sourceOrigin:sourceSize:toBuffer:destinationOffset:"
      "destinationBytesPerRow:destinationBytesPerImage:"),
    B("synchronizeResource:"),
    B("synchronizeTexture:slice:level:"),
    B("generateMipmapsForTexture:"),
    B("optimizeContentsForGPUAccess:"),
    B("optimizeContentsForGPUAccess:slice:level:"),
    B("optimizeContentsForCPUAccess:"),
    B("optimizeContentsForCPUAccess:slice:level:"),
    B("resetCommandsInBuffer:withRange:"),
    B("copyIndirectCommandBuffer:sourceRange:destination:destinationIndex:"),
    B("optimizeIndirectCommandBuffer:withRange:"),
    B("resolveCounters:inRange:destinationBuffer:destinationOffset:"),
    B("getTextureAccessCounters:region:mipLevel:slice:resetCounters:countersBuffer:countersBufferOffset:"),
    B("resetTextureAccessCounters:region:mipLevel:slice:"),
    {COMPUTE | BLIT, "sampleCountersInBuffer:atSampleIndex:withBarrier:", AGX_KIND_CALL, 0},
    /* render encoder: the state and draws the seed guarded */
    R("setRenderPipelineState:"),
    R("setVertexBuffer:offset:atIndex:"),
    R("setVertexBytes:length:atIndex:"),
    R("setVertexTexture:atIndex:"),
    R("setFragmentBuffer:offset:atIndex:"),
    R("setFragmentBytes:length:atIndex:"),
    R("setFragmentTexture:atIndex:"),
    R("drawPrimitives:vertexStart:vertexCount:"),
    R("drawPrimitives:vertexStart:vertexCount:instanceCount:"),
    /* every encoder: fences, every end, destruction (on the completion path).
     * destroyImpl (AGX's, which the seed also hooks) runs inside dealloc on
     * the completion path: a locked row there would break the lock order. */
    {ENCODERS, "updateFence:", AGX_KIND_CALL, 0},
    {ENCODERS, "waitForFence:", AGX_KIND_CALL, 0},
    {ENCODERS, "endEncoding", AGX_KIND_END_ENCODER, 0},
    {ENCODERS, "deferredEndEncoding", AGX_KIND_END_ENCODER, 0},
    {ENCODERS, "dealloc", AGX_KIND_DEALLOC, AGX_ROW_OWN | AGX_ROW_UNLOCKED},
};
const size_t agx_hook_row_count = sizeof agx_hook_rows / sizeof agx_hook_rows[0];

#define AGX_MAX_REPORT AGX_HOOKS_REPORT_MAX

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static agx_discovery found[3];
static int discovered[3];
static int installed_driver;
static int last_discovered;
static agx_hook_report report[AGX_MAX_REPORT];
static size_t n_report;
static const char *image_mechanism[3];

/* Image loads (see agx_hooks_image_loaded): a generation counter the
 * callbacks bump, the one worker that acts on it, and counts for status. */
static _Atomic unsigned image_gen;
static _Atomic int worker_running;
static _Atomic uint64_t n_image_events, n_rediscoveries, n_rediscovered_hooks;

/* Why `cls` cannot take `row`, or NULL when it can. */
static const char *skip_reason(Class cls, const agx_hook_row *row, char *buf, size_t n) {
    SEL sel = sel_registerName(row->selector);
    if (!class_getInstanceMethod(cls, sel)) return "the class does not implement it";
    if (row->flags & AGX_ROW_OWN) {
        Method m = class_getInstanceMethod(cls, sel);
        IMP imp = method_getImplementation(m);
        /* the class on the chain whose method it is: the last one that still resolves it to this IMP */
        Class owner = cls;
        for (Class c = class_getSuperclass(cls); c; c = class_getSuperclass(c)) {
            Method mc = class_getInstanceMethod(c, sel);
            if (!mc || method_getImplementation(mc) != imp) break;
            owner = c;
        }
        if (!class_getSuperclass(owner)) {
            snprintf(buf, n, "inherited from the root class %s, not the driver's", class_getName(owner));
            return buf;
        }
    }
    return NULL;
}

static int uninstall_locked(void) {
    int removed = 0;
    char err[256];
    agx_lifecycle_set_tracking(0); /* first: nothing new is tracked while rows go */
    for (size_t i = 0; i < n_report; i++) {
        if (!report[i].installed) continue;
        int r = agx_swizzle_uninstall(report[i].class_name, report[i].selector, err, sizeof err);
        if (r > 0) removed += r;
        report[i].installed = 0;
        snprintf(report[i].skipped, sizeof report[i].skipped, "uninstalled");
    }
    installed_driver = AGX_DRIVER_NONE;
    return removed;
}

static int makes_objects(int kind) { return kind == AGX_KIND_MAKE_BUFFER || kind == AGX_KIND_MAKE_ENCODER; }

/* Apply every row to every class `d` has for its roles; hooks already
 * installed stay as they are (the engine answers "already"), so this is also
 * the incremental install after a rediscovery. The report is rebuilt in
 * table order. Factories go last: while tracking is on, an encoder is never
 * tracked through a new factory before its class's end and dealloc rows are
 * in. Under mu; returns how many hooks are new. */
static int apply_rows_locked(const agx_discovery *d) {
    n_report = 0;
    for (size_t r = 0; r < agx_hook_row_count; r++) {
        const agx_hook_row *row = &agx_hook_rows[r];
        for (int role = 0; role < AGX_ROLE_COUNT; role++) {
            if (!(row->roles & (1u << role))) continue;
            if (!d->n[role] && n_report < AGX_MAX_REPORT) {
                /* the role has no class here (MPSCommandBuffer not loaded): reported once per row */
                agx_hook_report *e = &report[n_report++];
                *e = (agx_hook_report){"", row->selector, role, row->kind, 0, "", 0};
                snprintf(e->skipped, sizeof e->skipped, "no %s class: %s", agx_role_names[role],
                         d->notes[role][0] ? d->notes[role] : "none found");
                continue;
            }
            for (int k = 0; k < d->n[role] && n_report < AGX_MAX_REPORT; k++) {
                Class cls = d->classes[role][k];
                agx_hook_report *e = &report[n_report++];
                *e = (agx_hook_report){class_getName(cls), row->selector, role, row->kind, 0, "", 0};
                char why[160];
                const char *skip = skip_reason(cls, row, why, sizeof why);
                if (skip) snprintf(e->skipped, sizeof e->skipped, "%s", skip);
                else snprintf(e->skipped, sizeof e->skipped, "pending"); /* installed below */
                e->unlocked = (row->flags & AGX_ROW_UNLOCKED) != 0;
            }
        }
    }
    int added = 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < n_report; i++) {
            agx_hook_report *e = &report[i];
            if (!e->class_name[0] || makes_objects(e->kind) != pass || strcmp(e->skipped, "pending") != 0) continue;
            char ierr[512];
            int kind = e->kind | (e->unlocked ? AGX_SWZ_NO_LOCK : 0);
            int res = agx_swizzle_install_kind(e->class_name, e->selector, kind, ierr, sizeof ierr);
            if (res < 0) {
                snprintf(e->skipped, sizeof e->skipped, "%.150s", ierr);
                continue;
            }
            e->installed = 1;
            e->skipped[0] = 0;
            added += res;
        }
    return added;
}

static void *rediscover_worker(void *arg);

void agx_hooks_image_loaded(void) {
    atomic_fetch_add(&image_gen, 1);
    atomic_fetch_add(&n_image_events, 1);
    if (atomic_exchange(&worker_running, 1)) return; /* the running worker sees the new generation */
    pthread_attr_t a;
    pthread_t t;
    int ok = pthread_attr_init(&a) == 0;
    if (ok) {
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        ok = pthread_create(&t, &a, rediscover_worker, NULL) == 0;
        pthread_attr_destroy(&a);
    }
    /* no thread: the event stays counted; the next install or rediscover() picks the classes up */
    if (!ok) atomic_store(&worker_running, 0);
}

static void *rediscover_worker(void *arg) {
    (void)arg;
    for (;;) {
        unsigned gen = atomic_load(&image_gen);
        char err[256];
        agx_hooks_rediscover(err, sizeof err);
        atomic_store(&worker_running, 0);
        if (atomic_load(&image_gen) == gen) break;        /* nothing loaded meanwhile */
        if (atomic_exchange(&worker_running, 1)) break;  /* a new worker took over */
    }
    return NULL;
}

int agx_hooks_install(int driver, char *err, size_t errlen) {
    if (driver != AGX_DRIVER_METAL && driver != AGX_DRIVER_MODEL) {
        snprintf(err, errlen, "unknown driver %d", driver);
        return -1;
    }
    pthread_mutex_lock(&mu);
    int rc = -1;
    if (!discovered[driver]) {
        if (agx_discover(driver, &found[driver], err, errlen) < 0) goto out;
        discovered[driver] = 1;
    } else {
        agx_discover_named(&found[driver]); /* what loaded since */
    }
    last_discovered = driver;
    if (installed_driver && installed_driver != driver) uninstall_locked();
    agx_lifecycle_attach();
    int added = apply_rows_locked(&found[driver]);
    int fresh = installed_driver != driver;
    installed_driver = driver;
    if (fresh) agx_lifecycle_set_tracking(1); /* last: every end and commit row is active now */
    /* from now on, classes that appear with new images are hooked as they come */
    if (!image_mechanism[driver]) image_mechanism[driver] = agx_watch_images(driver, agx_hooks_image_loaded);
    rc = added;
out:
    pthread_mutex_unlock(&mu);
    return rc;
}

int agx_hooks_rediscover(char *err, size_t errlen) {
    pthread_mutex_lock(&mu);
    int driver = installed_driver, added = 0;
    atomic_fetch_add(&n_rediscoveries, 1);
    if (driver) {
        if (agx_discover_named(&found[driver]) > 0) added = apply_rows_locked(&found[driver]);
        atomic_fetch_add(&n_rediscovered_hooks, (uint64_t)added);
    } else {
        snprintf(err, errlen, "no hooks installed: nothing to add to");
    }
    pthread_mutex_unlock(&mu);
    return added;
}

void agx_hooks_images(agx_hooks_image_stats *out) {
    out->events = atomic_load(&n_image_events);
    out->rediscoveries = atomic_load(&n_rediscoveries);
    out->rediscovered_hooks = atomic_load(&n_rediscovered_hooks);
    out->pending = atomic_load(&worker_running);
    int d = agx_hooks_driver();
    out->mechanism = d ? image_mechanism[d] : NULL;
}

int agx_hooks_uninstall(void) {
    pthread_mutex_lock(&mu);
    int n = uninstall_locked();
    pthread_mutex_unlock(&mu);
    return n;
}

int agx_hooks_driver(void) { return installed_driver; }
size_t agx_hooks_report_count(void) { return n_report; }

size_t agx_hooks_report_snapshot(agx_hook_report *out, size_t max) {
    pthread_mutex_lock(&mu);
    size_t n = n_report < max ? n_report : max;
    memcpy(out, report, n * sizeof *out);
    pthread_mutex_unlock(&mu);
    return n;
}
const agx_hook_report *agx_hooks_report(size_t i) { return i < n_report ? &report[i] : NULL; }

const agx_discovery *agx_hooks_discovery(void) { return last_discovered ? &found[last_discovered] : NULL; }
