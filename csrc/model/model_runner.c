/* model_runner.c: see model_runner.h. */
#include "model_runner.h"
#include "start_gate.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "discovery.h"
#include "driver_model.h"
#include "model_capi.h"

/* The model is hooked by the product's one AGX hook set (hook_table.c),
 * found by discovery as Metal is; reached through the C API (model_capi.h). */
int agx_model_hook(char *err, size_t errlen) { return agx_model_capi->hooks_install(AGX_DRIVER_MODEL, err, errlen); }

int agx_model_unhook(void) { return agx_model_capi->hooks_uninstall(); }

uint64_t agx_model_stream_key(int queue) { return 0x4147584d00000000ull | (uint32_t)queue; }

/* ------------------------------------------------------------ messages */

static SEL s_commandBuffer, s_computeEncoder, s_setPipeline, s_setBuffer, s_setBytes, s_dispatch, s_end,
    s_commit, s_wait, s_release, s_newQueue, s_newBuffer, s_newPipeline, s_contents;

static void sels(void) {
    if (s_contents) return;
    s_commandBuffer = sel_registerName("commandBuffer");
    s_computeEncoder = sel_registerName("computeCommandEncoder");
    s_setPipeline = sel_registerName("setComputePipelineState:");
    s_setBuffer = sel_registerName("setBuffer:offset:atIndex:");
    s_setBytes = sel_registerName("setBytes:length:atIndex:");
    s_dispatch = sel_registerName("dispatchThreads:threadsPerThreadgroup:");
    s_end = sel_registerName("endEncoding");
    s_commit = sel_registerName("commit");
    s_wait = sel_registerName("waitUntilCompleted");
    s_release = sel_registerName("release");
    s_newQueue = sel_registerName("newCommandQueue");
    s_newBuffer = sel_registerName("newBufferWithLength:options:");
    s_newPipeline = sel_registerName("newComputePipelineStateWithName:");
    s_contents = sel_registerName("contents");
}

#define SEND0(T, o, s) ((T(*)(id, SEL))agx_objc_lookup(o, s))(o, s)

static id new_buffer(id dev, uint64_t bytes) {
    return ((id(*)(id, SEL, uint64_t, uint64_t))agx_objc_lookup(dev, s_newBuffer))(dev, s_newBuffer, bytes, 0);
}

/* The op pattern of one MPS op: command buffer, encoder, state, buffers,
 * dispatch, end, commit, wait. The buffer and the encoder get the queue's
 * stream from the factory hooks (lifecycle.c), not from here. `end` 0 skips
 * endEncoding (a caller bug that commit safety covers). */
static void one_op(id queue, id pipe, id x, id y, float a, uint64_t n, int internal, int end) {
    id cb = SEND0(id, queue, s_commandBuffer);
    id enc = SEND0(id, cb, s_computeEncoder);
    if (internal) {
        agx_model_encode_saxpy(enc, pipe, x, y, a, n);
    } else {
        agx_mtl_size grid = {n, 1, 1}, tg = {n < 256 ? n : 256, 1, 1};
        ((void (*)(id, SEL, id))agx_objc_lookup(enc, s_setPipeline))(enc, s_setPipeline, pipe);
        ((void (*)(id, SEL, id, uint64_t, uint64_t))agx_objc_lookup(enc, s_setBuffer))(enc, s_setBuffer, x, 0, 0);
        ((void (*)(id, SEL, id, uint64_t, uint64_t))agx_objc_lookup(enc, s_setBuffer))(enc, s_setBuffer, y, 0, 1);
        ((void (*)(id, SEL, const void *, uint64_t, uint64_t))agx_objc_lookup(enc, s_setBytes))(
            enc, s_setBytes, &a, sizeof a, 2);
        ((void (*)(id, SEL, agx_mtl_size, agx_mtl_size))agx_objc_lookup(enc, s_dispatch))(enc, s_dispatch, grid, tg);
    }
    if (end) SEND0(void, enc, s_end);
    SEND0(void, cb, s_commit);
    SEND0(void, cb, s_wait);
    SEND0(void, cb, s_release);
}

/* ---------------------------------------------------------------- run */

typedef struct worker {
    const agx_run_options *o;
    id queue, pipe, x, y;
    uint64_t key;
    agx_gate *start;
    uint64_t internal_ops, mismatches;
    double t_start, t_end;
} worker;

static double now_s(void);

static void *worker_main(void *arg) {
    worker *w = arg;
    const agx_run_options *o = w->o;
    agx_gate_wait(w->start);
    w->t_start = now_s();
    for (int it = 0; it < o->iterations; it++) {
        int internal = o->internal_every > 0 && it % o->internal_every == o->internal_every - 1;
        agx_entry region; /* a region as guard() takes it, under the nesting rule (guard.h) */
        if (o->region) agx_model_capi->region_enter(&region, w->key);
        one_op(w->queue, w->pipe, w->x, w->y, 1.0f, o->length, internal, 1);
        if (o->region) agx_model_capi->region_exit(&region);
        w->internal_ops += internal;
    }
    w->t_end = now_s();
    /* y started at 0, x is all 1, a = 1: every element must equal iterations. */
    float *y = SEND0(void *, w->y, s_contents);
    for (uint64_t i = 0; i < o->length; i++) w->mismatches += y[i] != (float)o->iterations;
    return NULL;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int agx_model_run(const agx_run_options *o, agx_run_result *r, char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    if (o->threads < 1 || o->threads > 256 || o->iterations < 0 || o->length < 1 || o->length > (1u << 24)) {
        snprintf(err, errlen, "threads must be 1..256, iterations >= 0, length 1..16M");
        return -1;
    }
    id dev = agx_model_device();
    if (!dev) { snprintf(err, errlen, "the driver model could not be created"); return -1; }
    sels();
    id pipe = ((id(*)(id, SEL, const char *))agx_objc_lookup(dev, s_newPipeline))(dev, s_newPipeline, "saxpy");
    worker *ws = calloc(o->threads, sizeof *ws);
    pthread_t *ts = calloc(o->threads, sizeof *ts);
    agx_gate start;
    agx_gate_init(&start, o->threads + 1);
    id shared = o->shared_queue ? SEND0(id, dev, s_newQueue) : NULL;
    for (int t = 0; t < o->threads; t++) {
        worker *w = &ws[t];
        w->o = o;
        w->queue = shared ? shared : SEND0(id, dev, s_newQueue);
        w->key = agx_model_stream_key(shared ? 0 : t + 1);
        agx_model_capi->swizzle_set_stream(w->queue, w->key);
        w->pipe = pipe;
        w->x = new_buffer(dev, o->length * sizeof(float));
        w->y = new_buffer(dev, o->length * sizeof(float));
        float *x = SEND0(void *, w->x, s_contents);
        for (uint64_t i = 0; i < o->length; i++) x[i] = 1.0f;
        w->start = &start;
        pthread_create(&ts[t], NULL, worker_main, w);
    }
    agx_gate_wait(&start);
    for (int t = 0; t < o->threads; t++) pthread_join(ts[t], NULL);
    /* From the first worker's start to the last one's end. */
    double t0 = ws[0].t_start, t1 = ws[0].t_end;
    for (int t = 0; t < o->threads; t++) {
        if (ws[t].t_start < t0) t0 = ws[t].t_start;
        if (ws[t].t_end > t1) t1 = ws[t].t_end;
    }
    r->seconds = t1 - t0;
    for (int t = 0; t < o->threads; t++) {
        r->internal_ops += ws[t].internal_ops;
        r->mismatches += ws[t].mismatches;
    }
    r->ops = (uint64_t)o->threads * o->iterations;
    agx_gate_destroy(&start);
    /* Queues and buffers stay allocated: the model never frees its objects. */
    free(ws);
    free(ts);
    return 0;
}

/* ------------------------------------------------------------ one op */

#define MAX_OP_QUEUES 64
static id op_queues[MAX_OP_QUEUES];
static id op_pipe;
static pthread_mutex_t op_mu = PTHREAD_MUTEX_INITIALIZER;

int agx_model_run_op(int queue, float a, uint64_t length, int internal, int end, char *err, size_t errlen) {
    if (queue < 0 || queue >= MAX_OP_QUEUES || length < 1 || length > (1u << 24)) {
        snprintf(err, errlen, "queue must be 0..%d and length 1..16M", MAX_OP_QUEUES - 1);
        return -1;
    }
    id dev = agx_model_device();
    if (!dev) { snprintf(err, errlen, "the driver model could not be created"); return -1; }
    pthread_mutex_lock(&op_mu);
    sels();
    if (!op_pipe)
        op_pipe = ((id(*)(id, SEL, const char *))agx_objc_lookup(dev, s_newPipeline))(dev, s_newPipeline, "saxpy");
    if (!op_queues[queue]) {
        op_queues[queue] = SEND0(id, dev, s_newQueue);
        agx_model_capi->swizzle_set_stream(op_queues[queue], agx_model_stream_key(1000 + queue));
    }
    id q = op_queues[queue];
    pthread_mutex_unlock(&op_mu);
    id x = new_buffer(dev, length * sizeof(float)), y = new_buffer(dev, length * sizeof(float));
    float *xs = SEND0(void *, x, s_contents), *ys = SEND0(void *, y, s_contents);
    for (uint64_t i = 0; i < length; i++) xs[i] = (float)(i % 7), ys[i] = 1.0f;
    one_op(q, op_pipe, x, y, a, length, internal, end);
    int ok = 1;
    for (uint64_t i = 0; i < length; i++) ok &= ys[i] == a * (float)(i % 7) + 1.0f;
    /* Buffers are leaked on purpose: the model has no free path for them
     * (a recycled op might still point at them). */
    return ok;
}

/* ------------------------------------------------------------ one message */

int agx_model_send(uint64_t receiver, const char *selector, const uint64_t *a, int n, uint64_t *ret, char *err,
                   size_t errlen) {
    *ret = 0;
    id obj = (id)(uintptr_t)receiver;
    if (!obj) { snprintf(err, errlen, "the receiver is nil"); return -1; }
    SEL sel = sel_registerName(selector);
    Method m = class_getInstanceMethod(object_getClass(obj), sel);
    if (!m) {
        snprintf(err, errlen, "-[%s %s]: no such method", class_getName(object_getClass(obj)), selector);
        return -1;
    }
    char why[160];
    const char *shape = agx_model_capi->swizzle_shape_for(method_getTypeEncoding(m), why, sizeof why);
    /* "v(u64,u64)" or "u64(...)": every argument and the return are words */
    int words = 0, ok = shape != NULL;
    const char *p = shape ? strchr(shape, '(') : NULL;
    if (ok) ok = !strncmp(shape, "v(", 2) || !strncmp(shape, "u64(", 4);
    for (p = p ? p + 1 : NULL; ok && p && *p != ')'; words++) {
        if (strncmp(p, "u64", 3) != 0) ok = 0;
        p += 3;
        if (*p == ',') p++;
    }
    if (!ok) {
        snprintf(err, errlen, "-[%s %s] takes or returns something other than objects and integers (%s)",
                 class_getName(object_getClass(obj)), selector, shape ? shape : why);
        return -1;
    }
    if (words != n) {
        snprintf(err, errlen, "-[%s %s] takes %d arguments, not %d", class_getName(object_getClass(obj)), selector,
                 words, n);
        return -1;
    }
    IMP imp = agx_objc_lookup(obj, sel);
    int is_void = shape[0] == 'v';
    typedef uint64_t W;
    W r = 0;
    switch (n) {
    case 0: if (is_void) ((void (*)(id, SEL))imp)(obj, sel); else r = ((W(*)(id, SEL))imp)(obj, sel); break;
    case 1: if (is_void) ((void (*)(id, SEL, W))imp)(obj, sel, a[0]); else r = ((W(*)(id, SEL, W))imp)(obj, sel, a[0]); break;
    case 2:
        if (is_void) ((void (*)(id, SEL, W, W))imp)(obj, sel, a[0], a[1]);
        else r = ((W(*)(id, SEL, W, W))imp)(obj, sel, a[0], a[1]);
        break;
    case 3:
        if (is_void) ((void (*)(id, SEL, W, W, W))imp)(obj, sel, a[0], a[1], a[2]);
        else r = ((W(*)(id, SEL, W, W, W))imp)(obj, sel, a[0], a[1], a[2]);
        break;
    case 4:
        if (is_void) ((void (*)(id, SEL, W, W, W, W))imp)(obj, sel, a[0], a[1], a[2], a[3]);
        else r = ((W(*)(id, SEL, W, W, W, W))imp)(obj, sel, a[0], a[1], a[2], a[3]);
        break;
    default: snprintf(err, errlen, "at most 4 arguments"); return -1;
    }
    *ret = r;
    return 0;
}
