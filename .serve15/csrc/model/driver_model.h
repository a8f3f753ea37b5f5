/* driver_model.h: a Metal-shaped driver made of Objective-C classes built at
 * run time in plain C, carrying the AGX driver's thread-safety bugs.
 *
 * It knows nothing of agxguard (it includes no guard code), as Apple's driver
 * does not: every fault comes from a real interleaving of threads over the
 * model's shared state. A window (spins and/or yields inside the critical
 * stretches) widens races; with no concurrent caller it changes nothing.
 *
 * Classes (AGX family names): AGXModelG16XDevice, AGXModelG16XFamilyCommandQueue,
 * AGXModelG16XFamilyCommandBuffer, AGXModelG16XFamilyComputeContext (compute
 * encoder), AGXModelG16XFamilyBlitContext (blit encoder), AGXModelG16XBuffer,
 * AGXModelG16XComputePipelineState, AGXModelG16XSharedEvent. Instances are
 * made by the device and by the selectors Metal uses; callers send messages
 * through the runtime.
 *
 * As Metal's: a queue has a fixed number of command buffer slots
 * (newCommandQueueWithMaxCommandBufferCount:, 64 for newCommandQueue) and
 * commandBuffer blocks while all are uncompleted; commit hands the buffer to
 * the device's completion thread, which runs it (the GPU), marks it
 * completed, and drops the driver's references by sending release to its
 * encoders (the last one deallocs) and to the buffer (which frees its slot);
 * encodeWaitForEvent:value: makes that thread wait for a shared event;
 * ending an encoder twice is a driver assertion (abort). */
#ifndef AGX_DRIVER_MODEL_H
#define AGX_DRIVER_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "objc_compat.h"

typedef struct agx_mtl_size { uint64_t width, height, depth; } agx_mtl_size;
typedef struct agx_ns_range { uint64_t location, length; } agx_ns_range;

typedef struct agx_model_config {
    int context_race;    /* one device-wide compute context, nulled by endEncoding */
    int encoder_recycle; /* device-wide encoder pool popped/pushed without its lock */
    int buffer_recycle;  /* per-queue command buffer pool without its lock:
                            double commit, two encoders open on one buffer */
    int bypass;          /* the internal dispatch path calls IMPs cached at class creation */
    int window_spins;    /* busy-wait iterations inside each critical stretch */
    int window_yields;   /* sched_yield() calls inside each critical stretch */
} agx_model_config;

/* Creates the classes and the device (idempotent). 0, or -1 if the runtime refused. */
int agx_model_init(void);
void agx_model_configure(const agx_model_config *c);
void agx_model_get_config(agx_model_config *c);

/* Waits until the completion thread has finished every committed buffer,
 * its releases included (so object counts are settled). 0, or -1 after the
 * model's hang limit. */
int agx_model_wait_idle(void);

/* MTLCreateSystemDefaultDevice(). */
id agx_model_device(void);

/* Class names, for hook tables and discovery. */
extern const char *const agx_model_device_class;
extern const char *const agx_model_queue_class;
extern const char *const agx_model_cmdbuf_class;
extern const char *const agx_model_compute_class;
extern const char *const agx_model_blit_class;
extern const char *const agx_model_buffer_class;
extern const char *const agx_model_pipeline_class;
extern const char *const agx_model_event_class;

/* The internal dispatch path (what MPS kernels do): set the pipeline, bind
 * x, y and the scalar a, dispatch n threads of y = a*x + y. With the bypass
 * bug on it calls implementations cached when the class was made, so no
 * swizzle sees these calls; with it off it sends messages. */
void agx_model_encode_saxpy(id encoder, id pipeline, id x, id y, float a, uint64_t n);

/* Message-send helpers for callers in C (they go through any swizzle). */
id agx_msg_id(id obj, const char *sel);                 /* -(id)sel */
void agx_msg_void(id obj, const char *sel);             /* -(void)sel */

#endif
