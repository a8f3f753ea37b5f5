/* model_images.h: the driver model's stand-in for dyld, and its object
 * accounting.
 *
 * Images: GCC's runtime has no image-load callback, so the model has its own
 * loader. agx_model_load_image("mps") registers the classes of the model's
 * MetalPerformanceShaders image at run time (MPSModelCommandBuffer, which
 * wraps a model command buffer and forwards to it, as MPSCommandBuffer wraps
 * an MTLCommandBuffer) and then calls every function registered with
 * agx_model_add_image_func, on the loading thread and with the loader's lock
 * held, as Apple's runtime calls objc_addLoadImageFunc's functions with its
 * runtime lock held.
 *
 * Live objects: the model counts the objects it has handed out and not had
 * back (a queue until its release, a command buffer until its release, an
 * encoder until its dealloc, each debug-layer wrapper and MPS command buffer
 * until its last release), so a test can see what a caller leaks. */
#ifndef AGX_MODEL_IMAGES_H
#define AGX_MODEL_IMAGES_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "objc_compat.h"

extern const char *const agx_model_mps_cmdbuf_class; /* "MPSModelCommandBuffer" */

/* Called with the image's name; see above for the context it runs in. */
typedef void (*agx_model_image_func)(const char *image);
/* Register `fn`: it is called at once for every image already loaded, then
 * for each image loaded later. */
void agx_model_add_image_func(agx_model_image_func fn);
/* Load image `name` ("mps"): 1 when loaded now, 0 when it already was, -1
 * with err for an unknown name or a class the runtime refused. */
int agx_model_load_image(const char *name, char *err, size_t errlen);
int agx_model_image_loaded(const char *name);
/* Image names the loader knows, loaded or not ("mps"). */
extern const char *const agx_model_image_names[];

/* +[MPSModelCommandBuffer commandBufferFromCommandQueue:]: a new MPS command
 * buffer over a fresh command buffer of `queue` (NULL before the image loads). */
id agx_model_mps_command_buffer(id queue);
/* One op (y = a*x + y over `length` floats) through an MPS command buffer on
 * model queue slot `queue` (its own queues, made on first use). 1 when the
 * result is right, 0 when not, -1 with err. Call without the GIL. */
int agx_model_mps_run_op(int queue, float a, uint64_t length, char *err, size_t errlen);

enum {
    AGX_LIVE_QUEUE = 0,      /* newCommandQueue .. release */
    AGX_LIVE_COMMAND_BUFFER, /* commandBuffer .. release (back to its queue's pool) */
    AGX_LIVE_ENCODER,        /* encoder factory .. dealloc (back to the device's pool) */
    AGX_LIVE_DEBUG_WRAPPER,  /* debug-layer wrappers, made .. last release */
    AGX_LIVE_MPS_BUFFER,     /* MPS command buffers, made .. release */
    AGX_LIVE_KINDS
};
extern const char *const agx_model_live_names[AGX_LIVE_KINDS];
extern _Atomic long agx_model_live[AGX_LIVE_KINDS];
static inline void agx_model_live_add(int kind, long delta) { atomic_fetch_add(&agx_model_live[kind], delta); }

#endif
