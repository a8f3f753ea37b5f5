/* model_images.c: the driver model's image loader, its MPS image, and the
 * live-object counts (see model_images.h). */
#include "model_images.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_model.h"
#include "model_debug_layer.h"

const char *const agx_model_mps_cmdbuf_class = "MPSModelCommandBuffer";
const char *const agx_model_image_names[] = {"mps", NULL};
const char *const agx_model_live_names[AGX_LIVE_KINDS] = {"command_queues", "command_buffers", "encoders",
                                                          "debug_wrappers", "mps_command_buffers"};
_Atomic long agx_model_live[AGX_LIVE_KINDS];

#define MAX_IMAGE_FUNCS 8

/* The loader's lock: held while an image registers its classes and while
 * the callbacks run (Apple's runtime holds its runtime lock there). */
static pthread_mutex_t loader_mu = PTHREAD_MUTEX_INITIALIZER;
static agx_model_image_func funcs[MAX_IMAGE_FUNCS];
static int n_funcs;
static int mps_loaded;
static Class c_mps;

/* ------------------------------------------------------ the MPS image */

typedef struct mps_ivars {
    id inner; /* first: the forwarders send to it */
    id queue;
    _Atomic int released;
} mps_ivars;

/* The underlying command buffer (MPSCommandBuffer's commandBuffer and
 * rootCommandBuffer: the model has no nesting). */
static id mps_commandBuffer(id self, SEL cmd) { (void)cmd; return ((mps_ivars *)object_getIndexedIvars(self))->inner; }

/* The owner's release: the underlying buffer goes back to its queue. */
static void mps_release(id self, SEL cmd) {
    mps_ivars *v = object_getIndexedIvars(self);
    int was = 0;
    if (!atomic_compare_exchange_strong(&v->released, &was, 1)) return;
    ((void (*)(id, SEL))agx_objc_lookup(v->inner, cmd))(v->inner, cmd);
    agx_model_live_add(AGX_LIVE_MPS_BUFFER, -1);
}

static id mps_make(id cls, SEL cmd, id queue) {
    (void)cmd;
    if (!queue) return NULL;
    SEL cb = sel_registerName("commandBuffer");
    id inner = ((id(*)(id, SEL))agx_objc_lookup(queue, cb))(queue, cb); /* a message: its hooks see it */
    if (!inner) return NULL;
    id o = class_createInstance((Class)cls, sizeof(mps_ivars));
    memset(object_getIndexedIvars(o), 0, sizeof(mps_ivars));
    mps_ivars *v = object_getIndexedIvars(o);
    v->inner = inner;
    v->queue = queue;
    agx_model_live_add(AGX_LIVE_MPS_BUFFER, 1);
    return o;
}

/* Under loader_mu. */
static int load_mps(char *err, size_t errlen) {
    if (mps_loaded) return 0;
    if (agx_model_init() < 0) { snprintf(err, errlen, "the driver model could not be created"); return -1; }
    Class base = objc_getClass(agx_model_cmdbuf_class);
    if (objc_getClass(agx_model_mps_cmdbuf_class) || !base) {
        snprintf(err, errlen, "class %s is taken (or the model has no command buffer class)", agx_model_mps_cmdbuf_class);
        return -1;
    }
    Class c = agx_objc_new_root_class(agx_model_mps_cmdbuf_class); /* isa slot and +initialize */
    if (!c) { snprintf(err, errlen, "the runtime refused class %s", agx_model_mps_cmdbuf_class); return -1; }
    class_addMethod(c, sel_registerName("commandBuffer"), (IMP)mps_commandBuffer, "@@:");
    class_addMethod(c, sel_registerName("rootCommandBuffer"), (IMP)mps_commandBuffer, "@@:");
    class_addMethod(c, sel_registerName("release"), (IMP)mps_release, "Vv@:");
    Class meta = object_getClass((id)c);
    class_addMethod(meta, sel_registerName("commandBufferFromCommandQueue:"), (IMP)mps_make, "@#:@");
    /* everything else of the MTLCommandBuffer protocol goes to the underlying buffer */
    static const char *const own[] = {"retain", "release", "dealloc", "initialize", NULL};
    agx_model_add_forwarders(c, base, own);
    objc_registerClassPair(c);
    /* One message so the GNU runtime installs the class's dispatch table now,
     * as a class used since its image loaded has (a hook installed before
     * that would otherwise go to a prepared copy). */
    id probe = class_createInstance(c, sizeof(mps_ivars));
    memset(object_getIndexedIvars(probe), 0, sizeof(mps_ivars));
    SEL s = sel_registerName("rootCommandBuffer");
    ((id(*)(id, SEL))agx_objc_lookup(probe, s))(probe, s);
    c_mps = c;
    mps_loaded = 1;
    return 1;
}

/* ------------------------------------------------------------- loader */

void agx_model_add_image_func(agx_model_image_func fn) {
    pthread_mutex_lock(&loader_mu);
    if (n_funcs < MAX_IMAGE_FUNCS) funcs[n_funcs++] = fn;
    fn("AGXModel"); /* the driver itself, loaded with the model */
    if (mps_loaded) fn("mps");
    pthread_mutex_unlock(&loader_mu);
}

int agx_model_load_image(const char *name, char *err, size_t errlen) {
    if (!name || strcmp(name, "mps") != 0) {
        snprintf(err, errlen, "unknown model image %s (known: mps)", name ? name : "(null)");
        return -1;
    }
    pthread_mutex_lock(&loader_mu);
    int rc = load_mps(err, errlen);
    if (rc == 1)
        for (int i = 0; i < n_funcs; i++) funcs[i](name);
    pthread_mutex_unlock(&loader_mu);
    return rc;
}

int agx_model_image_loaded(const char *name) {
    if (!name) return 0;
    if (!strcmp(name, "AGXModel")) return 1;
    pthread_mutex_lock(&loader_mu);
    int r = !strcmp(name, "mps") && mps_loaded;
    pthread_mutex_unlock(&loader_mu);
    return r;
}

id agx_model_mps_command_buffer(id queue) {
    pthread_mutex_lock(&loader_mu);
    Class c = c_mps;
    pthread_mutex_unlock(&loader_mu);
    if (!c) return NULL;
    SEL s = sel_registerName("commandBufferFromCommandQueue:");
    return ((id(*)(id, SEL, id))agx_objc_lookup((id)c, s))((id)c, s, queue);
}

/* ------------------------------------------------------------- one op */

#define MAX_MPS_QUEUES 16
static id mps_queues[MAX_MPS_QUEUES];
static id mps_pipe;
static pthread_mutex_t op_mu = PTHREAD_MUTEX_INITIALIZER;

static id send0(id o, const char *sel) {
    SEL s = sel_registerName(sel);
    return ((id(*)(id, SEL))agx_objc_lookup(o, s))(o, s);
}
static void send0_void(id o, const char *sel) {
    SEL s = sel_registerName(sel);
    ((void (*)(id, SEL))agx_objc_lookup(o, s))(o, s);
}
static void *send0_ptr(id o, const char *sel) {
    SEL s = sel_registerName(sel);
    return ((void *(*)(id, SEL))agx_objc_lookup(o, s))(o, s);
}

int agx_model_mps_run_op(int queue, float a, uint64_t length, char *err, size_t errlen) {
    if (queue < 0 || queue >= MAX_MPS_QUEUES || length < 1 || length > (1u << 20)) {
        snprintf(err, errlen, "queue must be 0..%d and length 1..1M", MAX_MPS_QUEUES - 1);
        return -1;
    }
    if (!agx_model_image_loaded("mps")) { snprintf(err, errlen, "the model's mps image is not loaded"); return -1; }
    id dev = agx_model_device();
    if (!dev) { snprintf(err, errlen, "the driver model could not be created"); return -1; }
    SEL s_pipe = sel_registerName("newComputePipelineStateWithName:"), s_buf = sel_registerName("newBufferWithLength:options:");
    pthread_mutex_lock(&op_mu);
    if (!mps_pipe) mps_pipe = ((id(*)(id, SEL, const char *))agx_objc_lookup(dev, s_pipe))(dev, s_pipe, "saxpy");
    if (!mps_queues[queue]) mps_queues[queue] = send0(dev, "newCommandQueue");
    id q = mps_queues[queue];
    pthread_mutex_unlock(&op_mu);
    id x = ((id(*)(id, SEL, uint64_t, uint64_t))agx_objc_lookup(dev, s_buf))(dev, s_buf, length * sizeof(float), 0);
    id y = ((id(*)(id, SEL, uint64_t, uint64_t))agx_objc_lookup(dev, s_buf))(dev, s_buf, length * sizeof(float), 0);
    float *xs = send0_ptr(x, "contents"), *ys = send0_ptr(y, "contents");
    for (uint64_t i = 0; i < length; i++) xs[i] = (float)(i % 5), ys[i] = 1.0f;
    id cb = agx_model_mps_command_buffer(q);
    id enc = send0(cb, "computeCommandEncoder");
    /* the internal path with the bypass off sends messages: the encoder's hooks see them */
    agx_model_encode_saxpy(enc, mps_pipe, x, y, a, length);
    send0_void(enc, "endEncoding");
    send0_void(cb, "commit");
    send0_void(cb, "waitUntilCompleted");
    send0_void(cb, "release");
    int ok = 1;
    for (uint64_t i = 0; i < length; i++) ok &= ys[i] == a * (float)(i % 5) + 1.0f;
    return ok; /* x and y stay allocated: the model has no free path for buffers */
}
