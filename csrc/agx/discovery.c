/* discovery.c: see discovery.h. Everything here runs on both runtimes except
 * the one block below, which reaches Metal, autorelease pools and the
 * image-load callbacks of Apple's runtime and dyld. */
#include "discovery.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>


static id send_id(id obj, const char *sel);
static id send_id_arg(id obj, const char *sel, uint64_t arg);
static void send_void(id obj, const char *sel);
static int has_agx_layer(id obj);

#ifdef __APPLE__
#include <dlfcn.h>
#include <mach-o/dyld.h>
/* Apple-only: Metal's entry points (both return an owned, +1, object), and
 * the autorelease pool around everything discovery makes. */
extern id MTLCreateSystemDefaultDevice(void);
extern id MTLCopyAllDevices(void);
extern void *objc_autoreleasePoolPush(void);
extern void objc_autoreleasePoolPop(void *pool);
int agx_metal_supported(void) { return 1; }
#define AGX_POOL_PUSH() objc_autoreleasePoolPush()
#define AGX_POOL_POP(p) objc_autoreleasePoolPop(p)

static uint64_t send_u64(id obj, const char *sel) {
    SEL s = sel_registerName(sel);
    return ((uint64_t(*)(id, SEL))agx_objc_lookup(obj, s))(obj, s);
}

/* The system default device; without one (a command-line process that
 * CoreGraphics did not set up, or a Mac whose default is not an Apple GPU)
 * the first Apple GPU of MTLCopyAllDevices. Owned (+1) by the caller. */
static id agx_metal_device(char *how, size_t n) {
    id dev = MTLCreateSystemDefaultDevice();
    if (dev && has_agx_layer(dev)) {
        snprintf(how, n, "MTLCreateSystemDefaultDevice");
        return dev;
    }
    id all = MTLCopyAllDevices();
    id pick = NULL;
    uint64_t count = all ? send_u64(all, "count") : 0;
    for (uint64_t i = 0; i < count && !pick; i++) {
        id d = send_id_arg(all, "objectAtIndex:", i);
        if (d && has_agx_layer(d)) pick = send_id(d, "retain"); /* ours beyond the array's life */
    }
    if (all) send_void(all, "release");
    if (pick) {
        if (dev) send_void(dev, "release");
        snprintf(how, n, "MTLCopyAllDevices (%s)", dev ? "the default device is not an Apple GPU"
                                                       : "MTLCreateSystemDefaultDevice returned nil");
        return pick;
    }
    snprintf(how, n, "%s", dev ? "MTLCreateSystemDefaultDevice" : "none");
    return dev; /* not an Apple GPU, or nil: the caller says which */
}

int agx_metal_devices(char (*names)[128], int max) {
    void *pool = AGX_POOL_PUSH();
    id all = MTLCopyAllDevices();
    int count = all ? (int)send_u64(all, "count") : 0;
    for (int i = 0; i < count && i < max; i++) {
        id d = send_id_arg(all, "objectAtIndex:", (uint64_t)i);
        snprintf(names[i], 128, "%s", d ? class_getName(object_getClass(d)) : "(nil)");
    }
    if (all) send_void(all, "release");
    AGX_POOL_POP(pool);
    return count;
}

/* Image loads. Both callbacks run with a lock held that the runtime calls
 * discovery makes would need (objc: runtimeLock; dyld: its loader lock), so
 * they only pass the event on; the receiver defers the work. */
static void (*metal_image_fn)(void);
static void on_objc_image(const struct mach_header *mh) {
    (void)mh;
    if (metal_image_fn) metal_image_fn();
}
static void on_dyld_image(const struct mach_header *mh, intptr_t slide) {
    (void)mh;
    (void)slide;
    if (metal_image_fn) metal_image_fn();
}
static const char *agx_watch_metal_images(void (*fn)(void)) {
    metal_image_fn = fn;
    /* objc_addLoadImageFunc is macOS 10.15+: looked up, so older systems take dyld's */
    void (*add)(void (*)(const struct mach_header *)) =
        (void (*)(void (*)(const struct mach_header *)))dlsym(RTLD_DEFAULT, "objc_addLoadImageFunc");
    if (add) {
        add(on_objc_image);
        return "objc_addLoadImageFunc";
    }
    _dyld_register_func_for_add_image(on_dyld_image);
    return "_dyld_register_func_for_add_image";
}
#else
int agx_metal_supported(void) { return 0; }
static id agx_metal_device(char *how, size_t n) { snprintf(how, n, "none"); return NULL; }
int agx_metal_devices(char (*names)[128], int max) { (void)names; (void)max; return 0; }
static const char *agx_watch_metal_images(void (*fn)(void)) { (void)fn; return NULL; }
/* GCC's runtime has no autorelease pool; the driver model autoreleases nothing. */
#define AGX_POOL_PUSH() NULL
#define AGX_POOL_POP(p) ((void)(p))
#endif

const char *const agx_driver_names[3] = {NULL, "metal", "model"};
const char *const agx_role_names[AGX_ROLE_COUNT] = {"command_queue", "command_buffer", "mps_command_buffer",
                                                     "compute_encoder", "blit_encoder", "render_encoder",
                                                     "parallel_render_encoder", "resource_state_encoder",
                                                     "acceleration_structure_encoder"};

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

static void send_void_arg(id obj, const char *sel, uint64_t arg) {
    SEL s = sel_registerName(sel);
    if (responds(obj, sel)) ((void (*)(id, SEL, uint64_t))agx_objc_lookup(obj, s))(obj, s, arg);
}

/* The object under a wrapper (MTLDebugDevice, MTLToolsObject: `baseObject`), or NULL. */
static id base_of(id obj) { return responds(obj, "baseObject") ? send_id(obj, "baseObject") : NULL; }

/* Whether `obj` or an object under it is an Apple GPU's (an AGX class). */
static int has_agx_layer(id obj) {
    for (int depth = 0; obj && depth <= AGX_MAX_LAYERS; depth++, obj = base_of(obj))
        if (strstr(class_getName(object_getClass(obj)), "AGX")) return 1;
    return 0;
}

static void add_class(agx_discovery *d, agx_role role, Class c) {
    if (!c) return;
    for (int i = 0; i < d->n[role]; i++)
        if (d->classes[role][i] == c) return;
    if (d->n[role] < AGX_MAX_ROLE_CLASSES) d->classes[role][d->n[role]++] = c;
}

/* `obj`'s class and the classes of the objects under it: the application
 * calls the outer ones, the wrappers and the driver's internal paths call the
 * inner ones, and each may race. */
static void add_layers(agx_discovery *d, agx_role role, id obj) {
    int depth = 0;
    for (; obj && depth <= AGX_MAX_LAYERS; depth++, obj = base_of(obj)) add_class(d, role, object_getClass(obj));
    if (depth - 1 > d->layers) d->layers = depth - 1;
}

static void note(agx_discovery *d, agx_role role, const char *text) {
    size_t len = strlen(d->notes[role]);
    snprintf(d->notes[role] + len, sizeof d->notes[role] - len, "%s%s", len ? "; " : "", text);
}

/* Make one encoder with `factory` (argument `arg` when it takes one), record
 * its classes and end it. The model and Metal both refuse a second open
 * encoder on a buffer, so each is ended before the next is made. Encoders
 * are not owned (Metal autoreleases them; the model's buffer holds them). */
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
    add_layers(d, role, enc);
    send_void(enc, "endEncoding");
}

/* The encoders PyTorch does not make (issue 13): render (through a pass
 * with no attachments, only a size), parallel render and its sub-encoder,
 * resource state, acceleration structure. A driver without them (the
 * model) leaves the roles empty, with a note. */
static void probe_other_encoders(agx_discovery *d, id cb) {
    Class pass_cls = objc_getClass("MTLRenderPassDescriptor");
    id pass = pass_cls ? send_id((id)pass_cls, "renderPassDescriptor") : NULL; /* autoreleased */
    if (pass) {
        send_void_arg(pass, "setRenderTargetWidth:", 16);
        send_void_arg(pass, "setRenderTargetHeight:", 16);
        send_void_arg(pass, "setDefaultRasterSampleCount:", 1);
    }
    if (pass || !responds(cb, "renderCommandEncoderWithDescriptor:"))
        probe_encoder(d, AGX_ROLE_RENDER_ENCODER, cb, "renderCommandEncoderWithDescriptor:", 1,
                      (uint64_t)(uintptr_t)pass);
    else
        note(d, AGX_ROLE_RENDER_ENCODER, "no MTLRenderPassDescriptor to make one with");
    if (!responds(cb, "parallelRenderCommandEncoderWithDescriptor:")) {
        note(d, AGX_ROLE_PARALLEL_RENDER_ENCODER, "parallelRenderCommandEncoderWithDescriptor:: not implemented");
    } else if (pass) {
        id par = send_id_arg(cb, "parallelRenderCommandEncoderWithDescriptor:", (uint64_t)(uintptr_t)pass);
        if (par) {
            add_layers(d, AGX_ROLE_PARALLEL_RENDER_ENCODER, par);
            id sub = responds(par, "renderCommandEncoder") ? send_id(par, "renderCommandEncoder") : NULL;
            if (sub) {
                add_layers(d, AGX_ROLE_RENDER_ENCODER, sub);
                send_void(sub, "endEncoding");
            }
            send_void(par, "endEncoding");
        }
    }
    probe_encoder(d, AGX_ROLE_RESOURCE_STATE_ENCODER, cb, "resourceStateCommandEncoder", 0, 0);
    probe_encoder(d, AGX_ROLE_ACCEL_STRUCT_ENCODER, cb, "accelerationStructureCommandEncoder", 0, 0);
}

/* ------------------------------------------------------------ providers */

static _Atomic(const agx_driver_provider *) model_provider;

int agx_discovery_set_provider(int driver, const agx_driver_provider *p) {
    if (driver != AGX_DRIVER_MODEL) return -1;
    atomic_store(&model_provider, p);
    return 0;
}

int agx_driver_present(int driver) {
    if (driver == AGX_DRIVER_METAL) return agx_metal_supported();
    if (driver == AGX_DRIVER_MODEL) return atomic_load(&model_provider) != NULL;
    return 0;
}

/* Classes known by name, per driver: MetalPerformanceShaders' command
 * buffer, and the model's stand-in (from its "mps" image). */
static const char *mps_class_name(int driver) {
    const agx_driver_provider *p = atomic_load(&model_provider);
    if (driver != AGX_DRIVER_MODEL) return "MPSCommandBuffer";
    return p && p->named_command_buffer_class ? p->named_command_buffer_class : NULL;
}

int agx_discover_named(agx_discovery *d) {
    const char *name = mps_class_name(d->driver);
    if (!name) return 0; /* a provider without such a class */
    Class mps = objc_getClass(name);
    if (!mps) {
        if (!d->notes[AGX_ROLE_MPS_COMMAND_BUFFER][0]) {
            const agx_driver_provider *p = atomic_load(&model_provider);
            const char *image = d->driver == AGX_DRIVER_MODEL && p && p->named_class_image ? p->named_class_image
                                                                                           : "MetalPerformanceShaders";
            char t[160];
            snprintf(t, sizeof t, "no class %s (%s not loaded yet; hooked when it loads)", name, image);
            note(d, AGX_ROLE_MPS_COMMAND_BUFFER, t);
        }
        return 0;
    }
    int before = d->n[AGX_ROLE_MPS_COMMAND_BUFFER];
    add_class(d, AGX_ROLE_MPS_COMMAND_BUFFER, mps);
    if (d->n[AGX_ROLE_MPS_COMMAND_BUFFER] == before) return 0;
    d->notes[AGX_ROLE_MPS_COMMAND_BUFFER][0] = 0;
    return 1;
}

int agx_discover(int driver, agx_discovery *d, char *err, size_t errlen) {
    memset(d, 0, sizeof *d);
    d->driver = driver;
    if (driver == AGX_DRIVER_METAL && !agx_metal_supported()) {
        snprintf(err, errlen, "no Metal here: Metal exists only on macOS (set AGXGUARD_DRIVER=model for the "
                              "driver model)");
        return -1;
    }
    if (driver != AGX_DRIVER_METAL && driver != AGX_DRIVER_MODEL) {
        snprintf(err, errlen, "no driver selected");
        return -1;
    }
    /* The pool goes first: Metal autoreleases objects while it makes the device. */
    void *pool = AGX_POOL_PUSH();
    int rc = -1;
    id dev = NULL, queue = NULL, cb = NULL;
    int own_dev = 0, own_cb = 0;
    if (driver == AGX_DRIVER_MODEL) {
        const agx_driver_provider *p = atomic_load(&model_provider);
        if (!p) {
            snprintf(err, errlen, "the driver model is not loaded: it is not part of the product; import "
                                  "agxguard._model (the lab's module, which registers it) first");
            goto out;
        }
        dev = p->device(); /* the model's device lives as long as the process: not ours */
        snprintf(d->how, sizeof d->how, "%s%s", p->name, base_of(dev) ? " under its debug layer" : "");
        if (!dev) { snprintf(err, errlen, "%s could not be created (its class names are taken)", p->name); goto out; }
        own_cb = p->command_buffers_owned; /* the model's commandBuffer hands out an owned buffer; Metal's is autoreleased */
    } else {
        dev = agx_metal_device(d->how, sizeof d->how);
        own_dev = dev != NULL;
        if (!dev) {
            snprintf(err, errlen, "no Metal device: MTLCreateSystemDefaultDevice() returned nil and "
                                  "MTLCopyAllDevices() has no Apple GPU");
            goto out;
        }
    }
    snprintf(d->device_class, sizeof d->device_class, "%s", class_getName(object_getClass(dev)));
    id base = dev;
    for (id b = base_of(base); b && d->layers < AGX_MAX_LAYERS; b = base_of(b)) base = b, d->layers++;
    snprintf(d->base_device_class, sizeof d->base_device_class, "%s", class_getName(object_getClass(base)));
    if (driver == AGX_DRIVER_METAL && !has_agx_layer(dev)) {
        snprintf(err, errlen, "the Metal device (%s) is not an Apple GPU (AGX): its driver has no AGX races to guard",
                 d->device_class);
        goto out;
    }
    queue = responds(dev, "newCommandQueue") ? send_id(dev, "newCommandQueue") : NULL; /* owned */
    if (!queue) { snprintf(err, errlen, "%s: newCommandQueue gave no queue", d->device_class); goto out; }
    add_layers(d, AGX_ROLE_QUEUE, queue);
    cb = send_id(queue, "commandBuffer");
    if (!cb) { snprintf(err, errlen, "%s: commandBuffer gave no command buffer", class_getName(object_getClass(queue))); goto out; }
    add_layers(d, AGX_ROLE_COMMAND_BUFFER, cb);

    probe_encoder(d, AGX_ROLE_COMPUTE_ENCODER, cb, "computeCommandEncoder", 0, 0);
    probe_encoder(d, AGX_ROLE_COMPUTE_ENCODER, cb, "computeCommandEncoderWithDispatchType:", 1, 1 /* concurrent */);
    Class desc_cls = objc_getClass("MTLComputePassDescriptor");
    id desc = desc_cls ? send_id((id)desc_cls, "computePassDescriptor") : NULL; /* autoreleased */
    probe_encoder(d, AGX_ROLE_COMPUTE_ENCODER, cb, "computeCommandEncoderWithDescriptor:", 1, (uint64_t)(uintptr_t)desc);
    probe_encoder(d, AGX_ROLE_BLIT_ENCODER, cb, "blitCommandEncoder", 0, 0);
    probe_other_encoders(d, cb);
    send_void(cb, "commit");
    if (responds(cb, "waitUntilCompleted")) send_void(cb, "waitUntilCompleted");

    agx_discover_named(d);
    if (!d->n[AGX_ROLE_COMPUTE_ENCODER]) {
        snprintf(err, errlen, "%s: no compute encoder could be made (%s)", d->device_class,
                 d->notes[AGX_ROLE_COMPUTE_ENCODER]);
        goto out;
    }
    rc = 0;
out:
    /* What discovery owns goes back before the pool drains what it does not. */
    if (cb && own_cb && responds(cb, "release")) send_void(cb, "release");
    if (queue && responds(queue, "release")) send_void(queue, "release");
    if (dev && own_dev) send_void(dev, "release");
    AGX_POOL_POP(pool);
    return rc;
}

/* ------------------------------------------------------------ images */

static void (*model_image_fn)(void);
static void on_model_image(const char *image) {
    (void)image;
    if (model_image_fn) model_image_fn();
}

const char *agx_watch_images(int driver, void (*fn)(void)) {
    static int watching[3];
    static const char *mechanism[3];
    if (driver != AGX_DRIVER_METAL && driver != AGX_DRIVER_MODEL) return NULL;
    if (watching[driver]) return mechanism[driver];
    watching[driver] = 1;
    if (driver == AGX_DRIVER_MODEL) {
        const agx_driver_provider *p = atomic_load(&model_provider);
        if (!p || !p->add_image_func) {
            watching[driver] = 0; /* nothing to watch yet: a later install tries again */
            return NULL;
        }
        model_image_fn = fn;
        p->add_image_func(on_model_image);
        mechanism[driver] = p->image_mechanism;
    } else {
        mechanism[driver] = agx_watch_metal_images(fn);
    }
    return mechanism[driver];
}
