/* discovery.c: see discovery.h. Everything here runs on both runtimes except
 * the one block below, which reaches Metal. */
#include "discovery.h"

#include <stdio.h>
#include <string.h>

#include "driver_model.h"

#ifdef __APPLE__
/* Apple-only: Metal's entry point, and an autorelease pool around the
 * objects discovery makes (they are autoreleased there). */
extern id MTLCreateSystemDefaultDevice(void);
extern void *objc_autoreleasePoolPush(void);
extern void objc_autoreleasePoolPop(void *pool);
int agx_metal_supported(void) { return 1; }
static id agx_metal_device(void) { return MTLCreateSystemDefaultDevice(); }
#define AGX_POOL_PUSH() objc_autoreleasePoolPush()
#define AGX_POOL_POP(p) objc_autoreleasePoolPop(p)
#else
int agx_metal_supported(void) { return 0; }
static id agx_metal_device(void) { return NULL; }
#define AGX_POOL_PUSH() NULL
#define AGX_POOL_POP(p) ((void)(p))
#endif

const char *const agx_driver_names[3] = {NULL, "metal", "model"};
const char *const agx_role_names[AGX_ROLE_COUNT] = {"command_queue", "command_buffer", "mps_command_buffer",
                                                     "compute_encoder", "blit_encoder"};

static int responds(id obj, const char *sel) {
    return obj && class_getInstanceMethod(object_getClass(obj), sel_registerName(sel)) != NULL;
}

static id send_id(id obj, const char *sel) {
    SEL s = sel_registerName(sel);
    return ((id(*)(id, SEL))agx_objc_lookup(obj, s))(obj, s);
}

static id send_id_arg(id obj, const char *sel, uint64_t arg) {
    SEL s = sel_registerName(sel);
    return ((id(*)(id, SEL, uint64_t))agx_objc_lookup(obj, s))(obj, s, arg);
}

static void send_void(id obj, const char *sel) {
    SEL s = sel_registerName(sel);
    ((void (*)(id, SEL))agx_objc_lookup(obj, s))(obj, s);
}

static void add_class(agx_discovery *d, agx_role role, Class c) {
    if (!c) return;
    for (int i = 0; i < d->n[role]; i++)
        if (d->classes[role][i] == c) return;
    if (d->n[role] < AGX_MAX_ROLE_CLASSES) d->classes[role][d->n[role]++] = c;
}

static void note(agx_discovery *d, agx_role role, const char *text) {
    size_t len = strlen(d->notes[role]);
    snprintf(d->notes[role] + len, sizeof d->notes[role] - len, "%s%s", len ? "; " : "", text);
}

/* Make one encoder with `factory` (argument `arg` when it takes one), record
 * its class and end it. The model and Metal both refuse a second open encoder
 * on a buffer, so each is ended before the next is made. */
static void probe_encoder(agx_discovery *d, agx_role role, id cb, const char *factory, int takes_arg,
                          uint64_t arg) {
    if (!responds(cb, factory)) {
        char t[120];
        snprintf(t, sizeof t, "%s: not implemented", factory);
        note(d, role, t);
        return;
    }
    id enc = takes_arg ? send_id_arg(cb, factory, arg) : send_id(cb, factory);
    if (!enc) {
        char t[120];
        snprintf(t, sizeof t, "%s returned nil", factory);
        note(d, role, t);
        return;
    }
    add_class(d, role, object_getClass(enc));
    send_void(enc, "endEncoding");
}

int agx_discover(int driver, agx_discovery *d, char *err, size_t errlen) {
    memset(d, 0, sizeof *d);
    d->driver = driver;
    id dev = NULL;
    if (driver == AGX_DRIVER_MODEL) {
        dev = agx_model_device();
        if (!dev) { snprintf(err, errlen, "the driver model could not be created (its class names are taken)"); return -1; }
    } else if (driver == AGX_DRIVER_METAL) {
        if (!agx_metal_supported()) {
            snprintf(err, errlen, "no Metal here: Metal exists only on macOS (set AGXGUARD_DRIVER=model for the "
                                  "driver model)");
            return -1;
        }
        dev = agx_metal_device();
        if (!dev) { snprintf(err, errlen, "MTLCreateSystemDefaultDevice() returned no device"); return -1; }
    } else {
        snprintf(err, errlen, "no driver selected");
        return -1;
    }
    snprintf(d->device_class, sizeof d->device_class, "%s", class_getName(object_getClass(dev)));
    if (driver == AGX_DRIVER_METAL && !strstr(d->device_class, "AGX")) {
        snprintf(err, errlen, "the Metal device (%s) is not an Apple GPU (AGX): its driver has no AGX races to guard",
                 d->device_class);
        return -1;
    }
    void *pool = AGX_POOL_PUSH();
    int rc = -1;
    id queue = responds(dev, "newCommandQueue") ? send_id(dev, "newCommandQueue") : NULL;
    if (!queue) { snprintf(err, errlen, "%s: newCommandQueue gave no queue", d->device_class); goto out; }
    add_class(d, AGX_ROLE_QUEUE, object_getClass(queue));
    id cb = send_id(queue, "commandBuffer");
    if (!cb) { snprintf(err, errlen, "%s: commandBuffer gave no command buffer", class_getName(object_getClass(queue))); goto out; }
    add_class(d, AGX_ROLE_COMMAND_BUFFER, object_getClass(cb));

    probe_encoder(d, AGX_ROLE_COMPUTE_ENCODER, cb, "computeCommandEncoder", 0, 0);
    probe_encoder(d, AGX_ROLE_COMPUTE_ENCODER, cb, "computeCommandEncoderWithDispatchType:", 1, 1 /* concurrent */);
    Class desc_cls = objc_getClass("MTLComputePassDescriptor");
    id desc = desc_cls ? send_id((id)desc_cls, "computePassDescriptor") : NULL;
    probe_encoder(d, AGX_ROLE_COMPUTE_ENCODER, cb, "computeCommandEncoderWithDescriptor:", 1, (uint64_t)(uintptr_t)desc);
    probe_encoder(d, AGX_ROLE_BLIT_ENCODER, cb, "blitCommandEncoder", 0, 0);
    send_void(cb, "commit");
    if (responds(cb, "waitUntilCompleted")) send_void(cb, "waitUntilCompleted");

    /* MetalPerformanceShaders' command buffer, when that framework is loaded. */
    Class mps = objc_getClass("MPSCommandBuffer");
    if (mps) add_class(d, AGX_ROLE_MPS_COMMAND_BUFFER, mps);
    else note(d, AGX_ROLE_MPS_COMMAND_BUFFER, "no class MPSCommandBuffer (MetalPerformanceShaders not loaded)");
    if (!d->n[AGX_ROLE_COMPUTE_ENCODER]) {
        snprintf(err, errlen, "%s: no compute encoder could be made (%s)", d->device_class,
                 d->notes[AGX_ROLE_COMPUTE_ENCODER]);
        goto out;
    }
    rc = 0;
out:
    AGX_POOL_POP(pool);
    return rc;
}
