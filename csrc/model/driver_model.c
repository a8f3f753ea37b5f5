/* driver_model.c: the Metal-shaped driver model (see driver_model.h).
 * Shared state and where each bug lives:
 *   device->current_ctx   device-wide compute context: dispatch publishes its
 *                         context there and reads it back in prepareForEnqueue;
 *                         any endEncoding nulls it (context_race) -> the 0x98 fault.
 *   device encoder pool   free list of encoders; endEncoding frees the
 *                         encoder's binding table; the encoder goes back to
 *                         the pool when its last reference goes (dealloc):
 *                         its command buffer holds one until it completes,
 *                         and retain/release add others. An unlocked pop can
 *                         hand one encoder to two threads (encoder_recycle)
 *                         -> a recycled encoder's next call dereferences its
 *                         freed table ("used after endEncoding").
 *   queue buffer pool     free list of command buffers; an unlocked pop can
 *                         hand one buffer to two threads (buffer_recycle) ->
 *                         "already encoding", "already committed" or
 *                         "uncommitted encoder" aborts.
 *   cached IMPs           taken at class creation; the internal dispatch path
 *                         calls them when bypass is on.
 * What is not a bug (Metal documents it thread-safe, so the model does it
 * right, each with its own mutex):
 *   queue slots           at most max_buffers uncompleted command buffers per
 *                         queue (newCommandQueueWithMaxCommandBufferCount:,
 *                         64 for newCommandQueue); commandBuffer blocks until
 *                         a completion frees one ("This method blocks the
 *                         calling CPU thread when the queue doesn't have any
 *                         free command buffers", MTLCommandQueue docs).
 *   completion            commit hands the buffer to the device's completion
 *                         thread, which runs its commands (waiting on shared
 *                         events as the GPU does), marks it completed, and
 *                         drops the driver's references: each encoder's
 *                         (-> dealloc) and the buffer's (-> release, which
 *                         frees its slot). Objects released there go back
 *                         through freed lists under a driver mutex; only the
 *                         encoding side moves them into the racy pools above
 *                         (commit for encoders, commandBuffer for buffers),
 *                         so the pools race between encoding threads, as the
 *                         seeds show, never with the completion thread.
 * Ending an encoder twice is a driver assertion, as in Metal. */
#include "driver_model.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model_debug_layer.h"
#include "model_images.h"

const char *const agx_model_device_class = "AGXModelG16XDevice";
const char *const agx_model_queue_class = "AGXModelG16XFamilyCommandQueue";
const char *const agx_model_cmdbuf_class = "AGXModelG16XFamilyCommandBuffer";
const char *const agx_model_compute_class = "AGXModelG16XFamilyComputeContext";
const char *const agx_model_blit_class = "AGXModelG16XFamilyBlitContext";
const char *const agx_model_buffer_class = "AGXModelG16XBuffer";
const char *const agx_model_pipeline_class = "AGXModelG16XComputePipelineState";
const char *const agx_model_event_class = "AGXModelG16XSharedEvent";

#define MAX_BINDINGS 8
#define MAX_CMDS 32
#define MAX_ENCODERS_PER_BUFFER 8

enum { KERNEL_SAXPY = 1 };
enum { CMD_DISPATCH = 1, CMD_FILL, CMD_COPY, CMD_WAIT_EVENT, CMD_SIGNAL_EVENT };
enum { CB_NOT_ENQUEUED = 0, CB_COMMITTED = 2, CB_COMPLETED = 4 };

typedef struct model_cmd {
    int type;
    int kernel;
    float *x, *y;
    float a;
    uint64_t n;
    unsigned char *dst, *src;
    uint64_t len;
    unsigned char value;
    id event;          /* CMD_WAIT_EVENT / CMD_SIGNAL_EVENT */
    uint64_t event_value;
} model_cmd;

typedef struct model_cmd_list {
    int count;
    model_cmd cmds[MAX_CMDS];
} model_cmd_list;

/* The AGX compute context: prepareForEnqueue reads the field at 0x98. */
typedef struct model_compute_ctx {
    char state[0x98];
    model_cmd_list *enqueue;
} model_compute_ctx;
_Static_assert(offsetof(model_compute_ctx, enqueue) == 0x98, "enqueue must sit at 0x98");

typedef struct model_bindings {
    int count;
    int pipeline_kernel;
    id buffers[MAX_BINDINGS];
    uint64_t offsets[MAX_BINDINGS];
    unsigned char bytes[MAX_BINDINGS][16];
} model_bindings;

typedef struct dev_ivars {
    model_compute_ctx *volatile current_ctx;
    id volatile encoder_pool;
    id volatile blit_pool;
    pthread_mutex_t pool_mu;
    _Atomic int queues;
    /* encoders dealloc'd (on the completion thread), not yet back in a pool */
    pthread_mutex_t freed_mu;
    id freed_encoders, freed_blits;
    /* the completion thread and its FIFO of committed buffers */
    pthread_mutex_t done_mu;
    pthread_cond_t work_cv;              /* a buffer was committed */
    pthread_cond_t completed_cv;         /* a buffer completed */
    int in_flight;                       /* committed, completion work not finished (under done_mu) */
    id work_head, work_tail;
    int completer_started;
} dev_ivars;

typedef struct queue_ivars {
    id device;
    int index;
    id volatile buffer_pool;
    pthread_mutex_t pool_mu;
    /* slots: at most max_buffers uncompleted buffers (thread-safe, as Metal's) */
    pthread_mutex_t slot_mu;
    pthread_cond_t slot_cv;
    uint64_t max_buffers, in_use;
    id freed_buffers;                    /* released buffers, not yet back in the pool */
} queue_ivars;

typedef struct cmdbuf_ivars {
    id queue;
    _Atomic int status;                  /* atomic: the completion thread publishes COMPLETED (and the results) */
    id volatile open_encoder;
    id volatile next_free;
    id next_work;                        /* the completion FIFO */
    _Atomic int refs;                    /* the caller's, plus the driver's from commit to completion */
    _Atomic int holds_slot;              /* until completed and released, or its last release */
    int n_made;                          /* encoders it holds a reference to */
    id made[MAX_ENCODERS_PER_BUFFER];
    model_cmd_list list;
} cmdbuf_ivars;

typedef struct event_ivars {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t value;
} event_ivars;

typedef struct enc_ivars {
    id device;
    id cmdbuf;
    model_bindings *volatile bindings; /* NULL once ended (freed) */
    model_compute_ctx ctx;
    id volatile next_free;
    int is_blit;
    _Atomic int refs;                  /* references; 0 -> dealloc -> pool */
    uint64_t resources;                /* useResource/useHeap/barrier/fence calls */
} enc_ivars;

typedef struct buffer_ivars {
    uint64_t length;
    unsigned char *contents;
} buffer_ivars;

typedef struct pipeline_ivars {
    int kernel;
} pipeline_ivars;

static agx_model_config cfg;
static pthread_mutex_t init_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int inited;
static Class c_device, c_queue, c_cmdbuf, c_compute, c_blit, c_buffer, c_pipeline, c_event;
static id the_device;

static SEL s_setPipeline, s_setBuffer, s_setBytes, s_dispatchThreads, s_endEncoding, s_release, s_dealloc;
/* Implementations captured when the classes were made (the bypass). */
static IMP cached_setPipeline, cached_setBuffer, cached_setBytes, cached_dispatchThreads;

#define IV(type, obj) ((type *)object_getIndexedIvars(obj))

void agx_model_configure(const agx_model_config *c) {
    cfg = *c;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void agx_model_get_config(agx_model_config *c) { *c = cfg; }

/* Widens a race; with no other thread in the stretch it changes nothing. */
static inline void window(void) {
    for (int i = 0; i < cfg.window_spins; i++) __asm__ __volatile__("" ::: "memory");
    for (int i = 0; i < cfg.window_yields; i++) sched_yield();
}

__attribute__((noreturn)) static void driver_assert(const char *where, const char *msg) {
    fprintf(stderr, "-[%s]: failed assertion `%s'\n", where, msg);
    fflush(stderr);
    abort();
}

static id new_instance(Class c, size_t ivars) {
    id o = class_createInstance(c, ivars);
    memset(object_getIndexedIvars(o), 0, ivars);
    return o;
}

/* ------------------------------------------------------------- buffers */

static void *buffer_contents(id self, SEL cmd) { (void)cmd; return IV(buffer_ivars, self)->contents; }
static uint64_t buffer_length(id self, SEL cmd) { (void)cmd; return IV(buffer_ivars, self)->length; }
static uint64_t pipeline_max_threads(id self, SEL cmd) { (void)self; (void)cmd; return 1024; }

/* -------------------------------------------------------------- device */

/* Metal's default: "up to 64 uncompleted command buffers at a time". */
#define DEFAULT_MAX_BUFFERS 64
/* How long commandBuffer, waitUntilCompleted and an event wait on the GPU
 * wait before the model calls it the hang it is (the real driver waits forever). */
#define HANG_SECONDS 5

static id new_queue(id dev, uint64_t max_buffers) {
    if (max_buffers < 1) return NULL; /* Metal returns nil for a queue it cannot make */
    id q = new_instance(c_queue, sizeof(queue_ivars));
    queue_ivars *qi = IV(queue_ivars, q);
    qi->device = dev;
    qi->index = atomic_fetch_add(&IV(dev_ivars, dev)->queues, 1);
    pthread_mutex_init(&qi->pool_mu, NULL);
    pthread_mutex_init(&qi->slot_mu, NULL);
    pthread_cond_init(&qi->slot_cv, NULL);
    qi->max_buffers = max_buffers;
    agx_model_live_add(AGX_LIVE_QUEUE, 1);
    return q;
}

/* The owner's release (the model never frees a queue: it is counted dead). */
static void queue_release(id self, SEL cmd) { (void)self; (void)cmd; agx_model_live_add(AGX_LIVE_QUEUE, -1); }

static id device_newCommandQueue(id self, SEL cmd) { (void)cmd; return new_queue(self, DEFAULT_MAX_BUFFERS); }

static id device_newCommandQueueWithMax(id self, SEL cmd, uint64_t max_buffers) {
    (void)cmd;
    return new_queue(self, max_buffers);
}

static id device_newSharedEvent(id self, SEL cmd) {
    (void)self; (void)cmd;
    id e = new_instance(c_event, sizeof(event_ivars));
    pthread_mutex_init(&IV(event_ivars, e)->mu, NULL);
    pthread_cond_init(&IV(event_ivars, e)->cv, NULL);
    return e;
}

/* --------------------------------------------------------------- events */

static uint64_t event_signaledValue(id self, SEL cmd) {
    (void)cmd;
    event_ivars *ev = IV(event_ivars, self);
    pthread_mutex_lock(&ev->mu);
    uint64_t v = ev->value;
    pthread_mutex_unlock(&ev->mu);
    return v;
}

static void event_setSignaledValue(id self, SEL cmd, uint64_t value) {
    (void)cmd;
    event_ivars *ev = IV(event_ivars, self);
    pthread_mutex_lock(&ev->mu);
    if (value > ev->value) ev->value = value;
    pthread_cond_broadcast(&ev->cv);
    pthread_mutex_unlock(&ev->mu);
}

static struct timespec deadline_in(int seconds) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += seconds;
    return t;
}

/* The model's hang detector: the real driver would wait forever. */
__attribute__((noreturn)) static void model_hang(const char *where) {
    fprintf(stderr, "AGXModel: %s: a command buffer never completes (hang)\n", where);
    fflush(stderr);
    abort();
}

static id device_newBuffer(id self, SEL cmd, uint64_t length, uint64_t options) {
    (void)self; (void)cmd; (void)options;
    id b = new_instance(c_buffer, sizeof(buffer_ivars));
    IV(buffer_ivars, b)->length = length;
    IV(buffer_ivars, b)->contents = calloc(1, length ? length : 1);
    return b;
}

static id device_newPipeline(id self, SEL cmd, const char *name) {
    (void)self; (void)cmd;
    if (!name || strcmp(name, "saxpy") != 0) return NULL;
    id p = new_instance(c_pipeline, sizeof(pipeline_ivars));
    IV(pipeline_ivars, p)->kernel = KERNEL_SAXPY;
    return p;
}

/* --------------------------------------------------------------- queue */

static id pool_pop(id volatile *head, pthread_mutex_t *mu, int racy, id volatile *(*next_of)(id)) {
    if (!racy) pthread_mutex_lock(mu);
    id o = *head;
    if (racy) window();
    if (o) *head = *next_of(o);
    if (!racy) pthread_mutex_unlock(mu);
    return o;
}

static void pool_push(id volatile *head, pthread_mutex_t *mu, int racy, id volatile *(*next_of)(id), id o) {
    if (!racy) pthread_mutex_lock(mu);
    id h = *head;
    if (racy) window();
    *next_of(o) = h;
    *head = o;
    if (!racy) pthread_mutex_unlock(mu);
}

static id volatile *cmdbuf_next(id o) { return &IV(cmdbuf_ivars, o)->next_free; }
static id volatile *enc_next(id o) { return &IV(enc_ivars, o)->next_free; }

/* Moves a freed list (taken under the driver's mutex) into a pool, with the
 * pool's own (racy or not) push: the encoding side's half of recycling. A
 * list that a double hand-back made circular is cut after MAX_REFILL. */
#define MAX_REFILL 4096
static void pool_refill(id volatile *head, pthread_mutex_t *mu, int racy, id volatile *(*next_of)(id), id freed) {
    for (int i = 0; freed && i < MAX_REFILL; i++) {
        id next = *next_of(freed);
        pool_push(head, mu, racy, next_of, freed);
        freed = next;
    }
}

static id queue_commandBuffer(id self, SEL cmd) {
    (void)cmd;
    queue_ivars *qi = IV(queue_ivars, self);
    /* a slot first: block while max_buffers are uncompleted (Metal's queue does) */
    pthread_mutex_lock(&qi->slot_mu);
    struct timespec until = deadline_in(HANG_SECONDS);
    while (qi->in_use >= qi->max_buffers)
        if (pthread_cond_timedwait(&qi->slot_cv, &qi->slot_mu, &until) == ETIMEDOUT && qi->in_use >= qi->max_buffers)
            model_hang("-[AGXModelG16XFamilyCommandQueue commandBuffer] waiting for a free command buffer");
    qi->in_use++;
    id freed = qi->freed_buffers;
    qi->freed_buffers = NULL;
    pthread_mutex_unlock(&qi->slot_mu);
    pool_refill(&qi->buffer_pool, &qi->pool_mu, cfg.buffer_recycle, cmdbuf_next, freed);
    id cb = pool_pop(&qi->buffer_pool, &qi->pool_mu, cfg.buffer_recycle, cmdbuf_next);
    if (!cb) cb = new_instance(c_cmdbuf, sizeof(cmdbuf_ivars));
    cmdbuf_ivars *ci = IV(cmdbuf_ivars, cb);
    ci->queue = self;
    ci->status = CB_NOT_ENQUEUED;
    ci->open_encoder = NULL;
    ci->next_free = NULL;
    ci->next_work = NULL;
    atomic_store(&ci->refs, 1); /* the caller's */
    atomic_store(&ci->holds_slot, 1);
    ci->n_made = 0;
    ci->list.count = 0;
    agx_model_live_add(AGX_LIVE_COMMAND_BUFFER, 1);
    return cb;
}

static id queue_commandBufferUnretained(id self, SEL cmd) { return queue_commandBuffer(self, cmd); }

static id queue_device(id self, SEL cmd) { (void)cmd; return IV(queue_ivars, self)->device; }

/* ------------------------------------------------------ command buffer */

static id make_encoder(id cb, int blit) {
    cmdbuf_ivars *ci = IV(cmdbuf_ivars, cb);
    id dev = IV(queue_ivars, ci->queue)->device;
    dev_ivars *di = IV(dev_ivars, dev);
    if (ci->open_encoder)
        driver_assert(blit ? "AGXModelG16XFamilyCommandBuffer blitCommandEncoder"
                           : "AGXModelG16XFamilyCommandBuffer computeCommandEncoder",
                      "A command encoder is already encoding to this command buffer");
    id enc = pool_pop(blit ? &di->blit_pool : &di->encoder_pool, &di->pool_mu, cfg.encoder_recycle, enc_next);
    if (!enc) enc = new_instance(blit ? c_blit : c_compute, sizeof(enc_ivars));
    enc_ivars *ei = IV(enc_ivars, enc);
    ei->device = dev;
    ei->cmdbuf = cb;
    ei->is_blit = blit;
    ei->next_free = NULL;
    ei->ctx.enqueue = &ci->list;
    ei->resources = 0;
    ei->bindings = calloc(1, sizeof(model_bindings));
    atomic_store(&ei->refs, 1); /* the command buffer's reference */
    int i = ci->n_made;
    if (i >= MAX_ENCODERS_PER_BUFFER)
        driver_assert("AGXModelG16XFamilyCommandBuffer", "too many encoders on one command buffer");
    ci->made[i] = enc;
    ci->n_made = i + 1;
    ci->open_encoder = enc;
    agx_model_live_add(AGX_LIVE_ENCODER, 1);
    return enc;
}

static id cmdbuf_computeCommandEncoder(id self, SEL cmd) { (void)cmd; return make_encoder(self, 0); }
static id cmdbuf_blitCommandEncoder(id self, SEL cmd) { (void)cmd; return make_encoder(self, 1); }
static id cmdbuf_blitCommandEncoderWithDescriptor(id self, SEL cmd, id descriptor) {
    (void)cmd; (void)descriptor;
    return make_encoder(self, 1);
}
/* The descriptor and the dispatch type change nothing in the model. */
static id cmdbuf_computeCommandEncoderWithDescriptor(id self, SEL cmd, id descriptor) {
    (void)cmd; (void)descriptor;
    return make_encoder(self, 0);
}
static id cmdbuf_computeCommandEncoderWithDispatchType(id self, SEL cmd, uint64_t type) {
    (void)cmd; (void)type;
    return make_encoder(self, 0);
}
static id cmdbuf_commandQueue(id self, SEL cmd) { (void)cmd; return IV(cmdbuf_ivars, self)->queue; }

/* Events order command buffers on the GPU: the completion thread waits at a
 * wait until the event reaches the value, and signals in command order. An
 * event of another driver (or nil) is recorded as nothing. */
static void encode_event(id self, SEL cmd, id event, uint64_t value, int type) {
    cmdbuf_ivars *ci = IV(cmdbuf_ivars, self);
    if (ci->status >= CB_COMMITTED) driver_assert(sel_getName(cmd), "encoding an event into a committed command buffer");
    if (ci->open_encoder) driver_assert(sel_getName(cmd), "A command encoder is already encoding to this command buffer");
    if (!event || object_getClass(event) != c_event) return;
    int i = ci->list.count;
    if (i >= MAX_CMDS) driver_assert(sel_getName(cmd), "command list overflow");
    ci->list.cmds[i] = (model_cmd){.type = type, .event = event, .event_value = value};
    ci->list.count = i + 1;
}
static void cmdbuf_encodeSignalEvent(id self, SEL cmd, id event, uint64_t value) {
    encode_event(self, cmd, event, value, CMD_SIGNAL_EVENT);
}
static void cmdbuf_encodeWaitForEvent(id self, SEL cmd, id event, uint64_t value) {
    encode_event(self, cmd, event, value, CMD_WAIT_EVENT);
}

static void run_cmd(const model_cmd *c) {
    switch (c->type) {
    case CMD_DISPATCH:
        if (c->kernel == KERNEL_SAXPY)
            for (uint64_t i = 0; i < c->n; i++) c->y[i] = c->a * c->x[i] + c->y[i];
        break;
    case CMD_FILL: memset(c->dst, c->value, c->len); break;
    case CMD_COPY: memmove(c->dst, c->src, c->len); break;
    case CMD_WAIT_EVENT: {
        event_ivars *ev = IV(event_ivars, c->event);
        pthread_mutex_lock(&ev->mu);
        struct timespec until = deadline_in(HANG_SECONDS);
        while (ev->value < c->event_value)
            if (pthread_cond_timedwait(&ev->cv, &ev->mu, &until) == ETIMEDOUT && ev->value < c->event_value)
                model_hang("the GPU waiting for an event that is never signaled");
        pthread_mutex_unlock(&ev->mu);
        break;
    }
    case CMD_SIGNAL_EVENT: event_setSignaledValue(c->event, NULL, c->event_value); break;
    }
}

/* The device's completion thread: runs each committed buffer in commit
 * order, marks it completed, then drops the driver's references (messages,
 * as the real driver's are: they reach any hook on release and dealloc). */
static void *completion_main(void *arg) {
    id dev = arg;
    dev_ivars *di = IV(dev_ivars, dev);
    for (;;) {
        pthread_mutex_lock(&di->done_mu);
        while (!di->work_head) pthread_cond_wait(&di->work_cv, &di->done_mu);
        id cb = di->work_head;
        cmdbuf_ivars *ci = IV(cmdbuf_ivars, cb);
        di->work_head = ci->next_work;
        if (!di->work_head) di->work_tail = NULL;
        pthread_mutex_unlock(&di->done_mu);
        /* The "GPU": runs the recorded commands for real. */
        int n = ci->list.count;
        if (n > MAX_CMDS) n = MAX_CMDS;
        for (int i = 0; i < n; i++) run_cmd(&ci->list.cmds[i]);
        /* Completed, then the driver's references go: the encoders' (the
         * last one deallocs) and the buffer's (freeing its slot). */
        int made = ci->n_made;
        if (made > MAX_ENCODERS_PER_BUFFER) made = MAX_ENCODERS_PER_BUFFER;
        id encoders[MAX_ENCODERS_PER_BUFFER];
        memcpy(encoders, ci->made, sizeof(id) * (size_t)made);
        ci->n_made = 0;
        pthread_mutex_lock(&di->done_mu);
        ci->status = CB_COMPLETED; /* atomic: publishes the results to waitUntilCompleted */
        pthread_cond_broadcast(&di->completed_cv);
        pthread_mutex_unlock(&di->done_mu);
        for (int i = 0; i < made; i++) ((void (*)(id, SEL))agx_objc_lookup(encoders[i], s_release))(encoders[i], s_release);
        ((void (*)(id, SEL))agx_objc_lookup(cb, s_release))(cb, s_release);
        pthread_mutex_lock(&di->done_mu);
        di->in_flight--;
        pthread_cond_broadcast(&di->completed_cv); /* agx_model_wait_idle */
        pthread_mutex_unlock(&di->done_mu);
    }
    return NULL;
}

/* A forked child has no completion thread: the next commit starts one. */
static void completion_after_fork(void) {
    if (!the_device) return;
    dev_ivars *di = IV(dev_ivars, the_device);
    pthread_mutex_init(&di->done_mu, NULL);
    pthread_cond_init(&di->work_cv, NULL);
    pthread_cond_init(&di->completed_cv, NULL);
    di->work_head = di->work_tail = NULL;
    di->completer_started = 0;
    di->in_flight = 0;
}

static void cmdbuf_commit(id self, SEL cmd) {
    (void)cmd;
    cmdbuf_ivars *ci = IV(cmdbuf_ivars, self);
    int status = ci->status;
    window();
    if (status >= CB_COMMITTED)
        driver_assert("AGXModelG16XFamilyCommandBuffer commit", "commit an already committed command buffer");
    if (ci->open_encoder)
        driver_assert("AGXModelG16XFamilyCommandBuffer commit", "commit command buffer with uncommitted encoder");
    ci->status = CB_COMMITTED;
    atomic_fetch_add(&ci->refs, 1); /* the driver's, until completion */
    dev_ivars *di = IV(dev_ivars, IV(queue_ivars, ci->queue)->device);
    /* Encoders dealloc'd since go back to the device's pools here, on the
     * committing thread (the pools' racy half stays on the encoding side). */
    pthread_mutex_lock(&di->freed_mu);
    id freed_enc = di->freed_encoders, freed_blit = di->freed_blits;
    di->freed_encoders = di->freed_blits = NULL;
    pthread_mutex_unlock(&di->freed_mu);
    pool_refill(&di->encoder_pool, &di->pool_mu, cfg.encoder_recycle, enc_next, freed_enc);
    pool_refill(&di->blit_pool, &di->pool_mu, cfg.encoder_recycle, enc_next, freed_blit);
    pthread_mutex_lock(&di->done_mu);
    if (!di->completer_started) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &a, completion_main, IV(queue_ivars, ci->queue)->device) != 0)
            driver_assert("AGXModelG16XFamilyCommandBuffer commit", "could not start the completion thread");
        pthread_attr_destroy(&a);
        di->completer_started = 1;
    }
    ci->next_work = NULL;
    if (di->work_tail) IV(cmdbuf_ivars, di->work_tail)->next_work = self;
    else di->work_head = self;
    di->work_tail = self;
    di->in_flight++;
    pthread_cond_signal(&di->work_cv);
    pthread_mutex_unlock(&di->done_mu);
}

int agx_model_wait_idle(void) {
    if (!the_device) return 0;
    dev_ivars *di = IV(dev_ivars, the_device);
    pthread_mutex_lock(&di->done_mu);
    struct timespec until = deadline_in(HANG_SECONDS);
    int rc = 0;
    while (di->in_flight > 0 && rc == 0)
        if (pthread_cond_timedwait(&di->completed_cv, &di->done_mu, &until) == ETIMEDOUT && di->in_flight > 0) rc = -1;
    pthread_mutex_unlock(&di->done_mu);
    return rc;
}

/* Blocks until the completion thread has completed the buffer (as Metal's does). */
static void cmdbuf_waitUntilCompleted(id self, SEL cmd) {
    (void)cmd;
    cmdbuf_ivars *ci = IV(cmdbuf_ivars, self);
    dev_ivars *di = IV(dev_ivars, IV(queue_ivars, ci->queue)->device);
    pthread_mutex_lock(&di->done_mu);
    struct timespec until = deadline_in(HANG_SECONDS);
    while (ci->status != CB_COMPLETED)
        if (pthread_cond_timedwait(&di->completed_cv, &di->done_mu, &until) == ETIMEDOUT && ci->status != CB_COMPLETED)
            model_hang("waitUntilCompleted");
    pthread_mutex_unlock(&di->done_mu);
}

static uint64_t cmdbuf_status(id self, SEL cmd) { (void)cmd; return (uint64_t)IV(cmdbuf_ivars, self)->status; }

/* Drops one reference. The slot frees once the buffer has completed (or at
 * its last release, for one never committed); the last release hands the
 * buffer back to its queue (the freed list; commandBuffer moves it into the
 * pool). A buffer two threads were handed (buffer_recycle) is over-released:
 * each extra release hands it back again, so it sits in the pool twice, as
 * a double free would leave it. */
static void cmdbuf_release(id self, SEL cmd) {
    (void)cmd;
    cmdbuf_ivars *ci = IV(cmdbuf_ivars, self);
    queue_ivars *qi = IV(queue_ivars, ci->queue);
    int was = atomic_fetch_sub(&ci->refs, 1);
    int last = was <= 1;
    int free_slot = (last || ci->status == CB_COMPLETED) && atomic_exchange(&ci->holds_slot, 0);
    if (!free_slot && !last) return;
    pthread_mutex_lock(&qi->slot_mu);
    if (free_slot) {
        qi->in_use--;
        pthread_cond_signal(&qi->slot_cv);
    }
    if (last) {
        agx_model_live_add(AGX_LIVE_COMMAND_BUFFER, -1);
        ci->next_free = qi->freed_buffers;
        qi->freed_buffers = self;
    }
    pthread_mutex_unlock(&qi->slot_mu);
}

/* ----------------------------------------------------- compute encoder */

/* The binding table of a live encoder; a recycled one has none, and the read
 * of its count faults as the freed encoder does in the real driver. */
static inline model_bindings *live_bindings(id self) {
    model_bindings *b = IV(enc_ivars, self)->bindings;
    if (!b) {
        fprintf(stderr, "AGXModel: -[%s]: encoder used after endEncoding\n", class_getName(object_getClass(self)));
        fflush(stderr);
    }
    (void)*(volatile int *)&b->count;
    return b;
}

static void enc_setComputePipelineState(id self, SEL cmd, id pipeline) {
    (void)cmd;
    model_bindings *b = live_bindings(self);
    b->pipeline_kernel = pipeline ? IV(pipeline_ivars, pipeline)->kernel : 0;
}

static void enc_setBuffer(id self, SEL cmd, id buffer, uint64_t offset, uint64_t index) {
    (void)cmd;
    model_bindings *b = live_bindings(self);
    if (index >= MAX_BINDINGS) return;
    b->buffers[index] = buffer;
    b->offsets[index] = offset;
    b->count++;
}

static void enc_setBytes(id self, SEL cmd, const void *bytes, uint64_t length, uint64_t index) {
    (void)cmd;
    model_bindings *b = live_bindings(self);
    if (index >= MAX_BINDINGS || length > sizeof b->bytes[0]) return;
    memcpy(b->bytes[index], bytes, length);
    b->count++;
}

/* AGX::ComputeContext::prepareForEnqueue: the command list at ctx + 0x98. */
static model_cmd_list *prepare_for_enqueue(model_compute_ctx *ctx) {
    model_compute_ctx *volatile c = ctx;
    return c->enqueue; /* ctx == NULL: EXC_BAD_ACCESS at 0x98 */
}

static void encode_dispatch(id self, uint64_t n) {
    enc_ivars *ei = IV(enc_ivars, self);
    model_bindings *b = live_bindings(self);
    model_compute_ctx *ctx = &ei->ctx;
    if (cfg.context_race) {
        dev_ivars *di = IV(dev_ivars, ei->device);
        di->current_ctx = ctx; /* publish the device-wide context */
        window();
        ctx = di->current_ctx; /* ... and read it back */
    }
    model_cmd_list *list = prepare_for_enqueue(ctx);
    if (b->pipeline_kernel != KERNEL_SAXPY || !b->buffers[0] || !b->buffers[1]) return;
    buffer_ivars *x = IV(buffer_ivars, b->buffers[0]), *y = IV(buffer_ivars, b->buffers[1]);
    uint64_t cap = (x->length - b->offsets[0]) / sizeof(float);
    uint64_t cap_y = (y->length - b->offsets[1]) / sizeof(float);
    if (cap_y < cap) cap = cap_y;
    if (n > cap) n = cap;
    int i = list->count;
    if (i >= MAX_CMDS) driver_assert("AGXModelG16XFamilyComputeContext dispatchThreads:threadsPerThreadgroup:",
                                     "command list overflow");
    model_cmd *c = &list->cmds[i];
    c->type = CMD_DISPATCH;
    c->kernel = KERNEL_SAXPY;
    c->x = (float *)(x->contents + b->offsets[0]);
    c->y = (float *)(y->contents + b->offsets[1]);
    memcpy(&c->a, b->bytes[2], sizeof(float));
    c->n = n;
    list->count = i + 1;
}

static void enc_dispatchThreads(id self, SEL cmd, agx_mtl_size grid, agx_mtl_size tg) {
    (void)cmd; (void)tg;
    encode_dispatch(self, grid.width * grid.height * grid.depth);
}

static void enc_dispatchThreadgroups(id self, SEL cmd, agx_mtl_size groups, agx_mtl_size tg) {
    (void)cmd;
    encode_dispatch(self, groups.width * groups.height * groups.depth * tg.width * tg.height * tg.depth);
}

/* The group counts come from the buffer (three uint32, as
 * MTLDispatchThreadgroupsIndirectArguments); the model reads them at encode
 * time, since its GPU runs at commit anyway. */
static void enc_dispatchIndirect(id self, SEL cmd, id buffer, uint64_t offset, agx_mtl_size tg) {
    (void)cmd;
    buffer_ivars *bi = IV(buffer_ivars, buffer);
    if (offset > bi->length || bi->length - offset < 3 * sizeof(uint32_t)) return;
    uint32_t g[3];
    memcpy(g, bi->contents + offset, sizeof g);
    encode_dispatch(self, (uint64_t)g[0] * g[1] * g[2] * tg.width * tg.height * tg.depth);
}

/* Bindings the model's kernel does not read: they still touch the encoder. */
static void enc_bind_object(id self, SEL cmd, id object, uint64_t index) {
    (void)cmd; (void)object; (void)index;
    live_bindings(self)->count++;
}
static void enc_setThreadgroupMemoryLength(id self, SEL cmd, uint64_t length, uint64_t index) {
    (void)cmd; (void)length; (void)index;
    live_bindings(self)->count++;
}
/* Residency, barriers, fences: counted on the live encoder. */
static void enc_note1(id self, SEL cmd, uint64_t a) {
    (void)cmd; (void)a;
    live_bindings(self);
    IV(enc_ivars, self)->resources++;
}
static void enc_note2(id self, SEL cmd, uint64_t a, uint64_t b) {
    (void)cmd; (void)a; (void)b;
    live_bindings(self);
    IV(enc_ivars, self)->resources++;
}
static void enc_note3(id self, SEL cmd, uint64_t a, uint64_t b, uint64_t c) {
    (void)cmd; (void)a; (void)b; (void)c;
    live_bindings(self);
    IV(enc_ivars, self)->resources++;
}

/* Metal's selectors with no typed wrapper (issue 13; the swizzle engine's
 * general forwarder takes them): exact prototypes, counted on the live
 * encoder like the notes above. */
typedef struct model_region { agx_mtl_size origin, size; } model_region;
static void enc_setBuffersWithRange(id self, SEL cmd, id const *buffers, const uint64_t *offsets, agx_ns_range r) {
    (void)cmd, (void)buffers, (void)offsets, (void)r;
    live_bindings(self)->count++;
}
static void enc_setSamplerLod(id self, SEL cmd, id sampler, float lo, float hi, uint64_t index) {
    (void)cmd, (void)sampler, (void)lo, (void)hi, (void)index;
    live_bindings(self)->count++;
}
static void blit_copyBufferToTexture(id self, SEL cmd, id buf, uint64_t off, uint64_t row, uint64_t image,
                                     agx_mtl_size size, id tex, uint64_t slice, uint64_t level, agx_mtl_size origin) {
    (void)cmd, (void)buf, (void)off, (void)row, (void)image, (void)size, (void)tex, (void)slice, (void)level,
        (void)origin;
    enc_note1(self, cmd, 0);
}
static void blit_resolveCounters(id self, SEL cmd, id heap, agx_ns_range r, id dst, uint64_t off) {
    (void)heap, (void)r, (void)dst, (void)off;
    enc_note1(self, cmd, 0);
}
static void blit_resetTextureAccessCounters(id self, SEL cmd, id tex, model_region region, uint64_t level,
                                            uint64_t slice) {
    (void)tex, (void)region, (void)level, (void)slice;
    enc_note1(self, cmd, 0);
}

static void end_encoding(id self, SEL cmd, int blit) {
    enc_ivars *ei = IV(enc_ivars, self);
    model_bindings *b = ei->bindings;
    if (!b) {
        /* Metal asserts on a second end; the model names the encoder's class and selector. */
        char where[160];
        snprintf(where, sizeof where, "%s %s", class_getName(object_getClass(self)), sel_getName(cmd));
        driver_assert(where, "endEncoding on an encoder that has already ended");
    }
    dev_ivars *di = IV(dev_ivars, ei->device);
    if (!blit && cfg.context_race) di->current_ctx = NULL; /* clears whoever's context it is */
    id cb = ei->cmdbuf;
    if (cb && IV(cmdbuf_ivars, cb)->open_encoder == self) IV(cmdbuf_ivars, cb)->open_encoder = NULL;
    ei->bindings = NULL;
    free(b);
}

static void enc_endEncoding(id self, SEL cmd) { end_encoding(self, cmd, 0); }

/* Reference counting, as the runtime's retain/release: the last release
 * deallocs, and dealloc gives the encoder back to the device's pool. */
static id enc_retain(id self, SEL cmd) {
    (void)cmd;
    atomic_fetch_add(&IV(enc_ivars, self)->refs, 1);
    return self;
}
static void enc_release(id self, SEL cmd) {
    (void)cmd;
    if (atomic_fetch_sub(&IV(enc_ivars, self)->refs, 1) == 1)
        ((void (*)(id, SEL))agx_objc_lookup(self, s_dealloc))(self, s_dealloc);
}
/* Onto the device's freed list (a driver mutex: dealloc runs on the
 * completion thread); the next commit moves it into the pool. */
static void enc_dealloc(id self, SEL cmd) {
    (void)cmd;
    enc_ivars *ei = IV(enc_ivars, self);
    dev_ivars *di = IV(dev_ivars, ei->device);
    pthread_mutex_lock(&di->freed_mu);
    id *list = ei->is_blit ? &di->freed_blits : &di->freed_encoders;
    ei->next_free = *list;
    *list = self;
    pthread_mutex_unlock(&di->freed_mu);
    agx_model_live_add(AGX_LIVE_ENCODER, -1);
}

/* -------------------------------------------------------- blit encoder */

static model_cmd *blit_cmd(id self) {
    live_bindings(self);
    enc_ivars *ei = IV(enc_ivars, self);
    model_cmd_list *list = &IV(cmdbuf_ivars, ei->cmdbuf)->list;
    if (list->count >= MAX_CMDS) driver_assert("AGXModelG16XFamilyBlitContext", "command list overflow");
    return &list->cmds[list->count++];
}

static void blit_fill(id self, SEL cmd, id buffer, agx_ns_range range, uint8_t value) {
    (void)cmd;
    buffer_ivars *bi = IV(buffer_ivars, buffer);
    if (range.location > bi->length || range.length > bi->length - range.location) return;
    model_cmd *c = blit_cmd(self);
    c->type = CMD_FILL;
    c->dst = bi->contents + range.location;
    c->len = range.length;
    c->value = value;
}

static void blit_copy(id self, SEL cmd, id src, uint64_t src_off, id dst, uint64_t dst_off, uint64_t size) {
    (void)cmd;
    buffer_ivars *s = IV(buffer_ivars, src), *d = IV(buffer_ivars, dst);
    if (src_off > s->length || size > s->length - src_off || dst_off > d->length || size > d->length - dst_off) return;
    model_cmd *c = blit_cmd(self);
    c->type = CMD_COPY;
    c->src = s->contents + src_off;
    c->dst = d->contents + dst_off;
    c->len = size;
}

static void blit_copyTexture(id self, SEL cmd, id src, uint64_t slice, uint64_t level, agx_mtl_size origin,
                             agx_mtl_size size, id dst, uint64_t dslice, uint64_t dlevel, agx_mtl_size dorigin) {
    /* The model has no textures: the copy is validated against the live encoder only. */
    (void)cmd; (void)src; (void)slice; (void)level; (void)origin; (void)size;
    (void)dst; (void)dslice; (void)dlevel; (void)dorigin;
    live_bindings(self);
}

static void blit_endEncoding(id self, SEL cmd) { end_encoding(self, cmd, 1); }

/* ---------------------------------------------------------------- setup */

static Class make_class(Class super, const char *name) {
    return super ? objc_allocateClassPair(super, name, 0) : agx_objc_new_root_class(name);
}

static void add(Class c, const char *sel, void *imp, const char *types) {
    class_addMethod(c, sel_registerName(sel), (IMP)imp, types);
}

/* What the compute and blit encoders both answer: fences and their lifetime. */
static void add_encoder_common(Class c) {
    add(c, "updateFence:", enc_note1, "v@:@");
    add(c, "waitForFence:", enc_note1, "v@:@");
    add(c, "retain", enc_retain, "@@:");
    add(c, "release", enc_release, "Vv@:");
    add(c, "dealloc", enc_dealloc, "v@:");
}

int agx_model_init(void) {
    if (atomic_load(&inited)) return 0;
    pthread_mutex_lock(&init_mu);
    if (atomic_load(&inited)) { pthread_mutex_unlock(&init_mu); return 0; }
    int rc = -1;
    Class root = objc_getClass("AGXModelObject");
    if (root) goto out; /* made by someone else: not ours to reuse */
    root = make_class(Nil, "AGXModelObject");
    if (!root) goto out;
    objc_registerClassPair(root);

    c_device = make_class(root, agx_model_device_class);
    add(c_device, "newCommandQueue", device_newCommandQueue, "@@:");
    add(c_device, "newCommandQueueWithMaxCommandBufferCount:", device_newCommandQueueWithMax, "@@:Q");
    add(c_device, "newSharedEvent", device_newSharedEvent, "@@:");
    add(c_device, "newBufferWithLength:options:", device_newBuffer, "@@:QQ");
    add(c_device, "newComputePipelineStateWithName:", device_newPipeline, "@@:r*");
    objc_registerClassPair(c_device);

    c_queue = make_class(root, agx_model_queue_class);
    add(c_queue, "commandBuffer", queue_commandBuffer, "@@:");
    add(c_queue, "commandBufferWithUnretainedReferences", queue_commandBufferUnretained, "@@:");
    add(c_queue, "device", queue_device, "@@:");
    add(c_queue, "release", queue_release, "Vv@:");
    objc_registerClassPair(c_queue);

    c_cmdbuf = make_class(root, agx_model_cmdbuf_class);
    add(c_cmdbuf, "computeCommandEncoder", cmdbuf_computeCommandEncoder, "@@:");
    add(c_cmdbuf, "blitCommandEncoder", cmdbuf_blitCommandEncoder, "@@:");
    add(c_cmdbuf, "blitCommandEncoderWithDescriptor:", cmdbuf_blitCommandEncoderWithDescriptor, "@@:@");
    add(c_cmdbuf, "computeCommandEncoderWithDescriptor:", cmdbuf_computeCommandEncoderWithDescriptor, "@@:@");
    add(c_cmdbuf, "computeCommandEncoderWithDispatchType:", cmdbuf_computeCommandEncoderWithDispatchType, "@@:Q");
    add(c_cmdbuf, "encodeSignalEvent:value:", cmdbuf_encodeSignalEvent, "v@:@Q");
    add(c_cmdbuf, "encodeWaitForEvent:value:", cmdbuf_encodeWaitForEvent, "v@:@Q");
    add(c_cmdbuf, "commandQueue", cmdbuf_commandQueue, "@@:");
    add(c_cmdbuf, "commit", cmdbuf_commit, "v@:");
    add(c_cmdbuf, "waitUntilCompleted", cmdbuf_waitUntilCompleted, "v@:");
    add(c_cmdbuf, "status", cmdbuf_status, "Q@:");
    add(c_cmdbuf, "release", cmdbuf_release, "Vv@:");
    objc_registerClassPair(c_cmdbuf);

    c_compute = make_class(root, agx_model_compute_class);
    add(c_compute, "setComputePipelineState:", enc_setComputePipelineState, "v@:@");
    add(c_compute, "setBuffer:offset:atIndex:", enc_setBuffer, "v@:@QQ");
    add(c_compute, "setBytes:length:atIndex:", enc_setBytes, "v@:r^vQQ");
    add(c_compute, "dispatchThreads:threadsPerThreadgroup:", enc_dispatchThreads,
        "v@:{MTLSize=QQQ}{MTLSize=QQQ}");
    add(c_compute, "dispatchThreadgroups:threadsPerThreadgroup:", enc_dispatchThreadgroups,
        "v@:{MTLSize=QQQ}{MTLSize=QQQ}");
    add(c_compute, "dispatchThreadgroupsWithIndirectBuffer:indirectBufferOffset:threadsPerThreadgroup:",
        enc_dispatchIndirect, "v@:@Q{MTLSize=QQQ}");
    add(c_compute, "setTexture:atIndex:", enc_bind_object, "v@:@Q");
    add(c_compute, "setSamplerState:atIndex:", enc_bind_object, "v@:@Q");
    add(c_compute, "setThreadgroupMemoryLength:atIndex:", enc_setThreadgroupMemoryLength, "v@:QQ");
    add(c_compute, "useResource:usage:", enc_note2, "v@:@Q");
    add(c_compute, "useResources:count:usage:", enc_note3, "v@:r^@QQ");
    add(c_compute, "useHeap:", enc_note1, "v@:@");
    add(c_compute, "useHeaps:count:", enc_note2, "v@:r^@Q");
    add(c_compute, "memoryBarrierWithScope:", enc_note1, "v@:Q");
    add(c_compute, "memoryBarrierWithResources:count:", enc_note2, "v@:r^@Q");
    add(c_compute, "setBuffers:offsets:withRange:", enc_setBuffersWithRange, "v@:r^@r^Q{_NSRange=QQ}");
    add(c_compute, "setSamplerState:lodMinClamp:lodMaxClamp:atIndex:", enc_setSamplerLod, "v@:@ffQ");
    add(c_compute, "endEncoding", enc_endEncoding, "v@:");
    add(c_compute, "deferredEndEncoding", enc_endEncoding, "v@:");
    add_encoder_common(c_compute);
    objc_registerClassPair(c_compute);

    c_blit = make_class(root, agx_model_blit_class);
    add(c_blit, "fillBuffer:range:value:", blit_fill, "v@:@{_NSRange=QQ}C");
    add(c_blit, "copyFromBuffer:sourceOffset:toBuffer:destinationOffset:size:", blit_copy, "v@:@Q@QQ");
    add(c_blit, "copyFromTexture:sourceSlice:sourceLevel:sourceOrigin:sourceSize:toTexture:destinationSlice:"
               "destinationLevel:destinationOrigin:",
        blit_copyTexture, "v@:@QQ{MTLOrigin=QQQ}{MTLSize=QQQ}@QQ{MTLOrigin=QQQ}");
    add(c_blit, "synchronizeResource:", enc_note1, "v@:@");
    add(c_blit, "copyFromBuffer:sourceOffset:sourceBytesPerRow:sourceBytesPerImage:sourceSize:toTexture:"
               "destinationSlice:destinationLevel:destinationOrigin:",
        blit_copyBufferToTexture, "v@:@QQQ{MTLSize=QQQ}@QQ{MTLOrigin=QQQ}");
    add(c_blit, "resolveCounters:inRange:destinationBuffer:destinationOffset:", blit_resolveCounters,
        "v@:@{_NSRange=QQ}@Q");
    add(c_blit, "resetTextureAccessCounters:region:mipLevel:slice:", blit_resetTextureAccessCounters,
        "v@:@{MTLRegion={MTLOrigin=QQQ}{MTLSize=QQQ}}QQ");
    add(c_blit, "endEncoding", blit_endEncoding, "v@:");
    /* AGX's private deferred end: the driver finishes the encoder's work
     * later, but for its caller the encoder has ended, as after endEncoding.
     * The model has no other end path: Metal allows one active encoder per
     * command buffer and makes the caller end it before the next (the
     * "already encoding" assertion), so there is no documented implicit end. */
    add(c_blit, "deferredEndEncoding", blit_endEncoding, "v@:");
    add_encoder_common(c_blit);
    objc_registerClassPair(c_blit);

    c_buffer = make_class(root, agx_model_buffer_class);
    add(c_buffer, "contents", buffer_contents, "^v@:");
    add(c_buffer, "length", buffer_length, "Q@:");
    objc_registerClassPair(c_buffer);

    c_pipeline = make_class(root, agx_model_pipeline_class);
    add(c_pipeline, "maxTotalThreadsPerThreadgroup", pipeline_max_threads, "Q@:");
    objc_registerClassPair(c_pipeline);

    c_event = make_class(root, agx_model_event_class);
    add(c_event, "signaledValue", event_signaledValue, "Q@:");
    add(c_event, "setSignaledValue:", event_setSignaledValue, "v@:Q");
    objc_registerClassPair(c_event);

    s_setPipeline = sel_registerName("setComputePipelineState:");
    s_setBuffer = sel_registerName("setBuffer:offset:atIndex:");
    s_setBytes = sel_registerName("setBytes:length:atIndex:");
    s_dispatchThreads = sel_registerName("dispatchThreads:threadsPerThreadgroup:");
    s_endEncoding = sel_registerName("endEncoding");
    s_release = sel_registerName("release");
    s_dealloc = sel_registerName("dealloc");
    /* The internal path's cache, taken once, as MPS caches method pointers. */
    cached_setPipeline = class_getMethodImplementation(c_compute, s_setPipeline);
    cached_setBuffer = class_getMethodImplementation(c_compute, s_setBuffer);
    cached_setBytes = class_getMethodImplementation(c_compute, s_setBytes);
    cached_dispatchThreads = class_getMethodImplementation(c_compute, s_dispatchThreads);

    the_device = new_instance(c_device, sizeof(dev_ivars));
    dev_ivars *di = IV(dev_ivars, the_device);
    pthread_mutex_init(&di->pool_mu, NULL);
    pthread_mutex_init(&di->freed_mu, NULL);
    pthread_mutex_init(&di->done_mu, NULL);
    pthread_cond_init(&di->work_cv, NULL);
    pthread_cond_init(&di->completed_cv, NULL);
    pthread_atfork(NULL, NULL, completion_after_fork);
    if ((void *)object_getIndexedIvars(the_device) == (void *)the_device) goto out; /* no isa slot */
    atomic_store(&inited, 1);
    rc = 0;
out:
    pthread_mutex_unlock(&init_mu);
    return rc;
}

/* Under the debug layer (model_debug_layer.h) the application gets its wrapper. */
id agx_model_device(void) { return agx_model_init() == 0 ? agx_model_debug_wrap_device(the_device) : NULL; }

void agx_model_encode_saxpy(id enc, id pipeline, id x, id y, float a, uint64_t n) {
    agx_mtl_size grid = {n, 1, 1}, tg = {n < 256 ? n : 256, 1, 1};
    IMP setp, setb, setby, disp;
    if (cfg.bypass) {
        enc = agx_model_debug_base(enc); /* the internal path works on the driver's own encoder */
        setp = cached_setPipeline, setb = cached_setBuffer, setby = cached_setBytes, disp = cached_dispatchThreads;
    } else {
        setp = agx_objc_lookup(enc, s_setPipeline);
        setb = agx_objc_lookup(enc, s_setBuffer);
        setby = agx_objc_lookup(enc, s_setBytes);
        disp = agx_objc_lookup(enc, s_dispatchThreads);
    }
    ((void (*)(id, SEL, id))setp)(enc, s_setPipeline, pipeline);
    ((void (*)(id, SEL, id, uint64_t, uint64_t))setb)(enc, s_setBuffer, x, 0, 0);
    ((void (*)(id, SEL, id, uint64_t, uint64_t))setb)(enc, s_setBuffer, y, 0, 1);
    ((void (*)(id, SEL, const void *, uint64_t, uint64_t))setby)(enc, s_setBytes, &a, sizeof a, 2);
    ((void (*)(id, SEL, agx_mtl_size, agx_mtl_size))disp)(enc, s_dispatchThreads, grid, tg);
}

id agx_msg_id(id obj, const char *sel) {
    SEL s = sel_registerName(sel);
    return ((id(*)(id, SEL))agx_objc_lookup(obj, s))(obj, s);
}

void agx_msg_void(id obj, const char *sel) {
    SEL s = sel_registerName(sel);
    ((void (*)(id, SEL))agx_objc_lookup(obj, s))(obj, s);
}
