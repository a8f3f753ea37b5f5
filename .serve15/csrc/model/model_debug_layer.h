/* model_debug_layer.h: the driver model's Metal API validation layer.
 *
 * With MTL_DEBUG_LAYER=1 (or Xcode's validation or frame capture) Metal hands
 * the application wrapper objects: the device is a debug device whose
 * `baseObject` is the AGX device, and the queues, command buffers and
 * encoders it makes are wrapped the same way; each wrapper checks the call
 * and sends it on to its base object. The model does the same when the layer
 * is on (AGX_MODEL_DEBUG_LAYER=1, read when the device is first asked for,
 * or agx_model_set_debug_layer): agx_model_device() returns a wrapper device
 * whose factories return wrappers that forward every other selector of the
 * wrapped class to the model's own object. Class names follow Metal's shape
 * without taking Apple's: MTLModelDebugDevice, MTLModelDebugCommandQueue,
 * MTLModelDebugCommandBuffer, MTLModelDebugComputeCommandEncoder,
 * MTLModelDebugBlitCommandEncoder, under the root MTLModelToolsObject.
 * Resources (buffers, pipelines) are not wrapped: no hook row touches them. */
#ifndef AGX_MODEL_DEBUG_LAYER_H
#define AGX_MODEL_DEBUG_LAYER_H

#include "objc_compat.h"

extern const char *const agx_model_debug_device_class;
extern const char *const agx_model_debug_queue_class;
extern const char *const agx_model_debug_cmdbuf_class;
extern const char *const agx_model_debug_compute_class;
extern const char *const agx_model_debug_blit_class;

/* Whether the layer is on (the environment is read on the first call). */
int agx_model_debug_layer_enabled(void);
/* Turn it on or off for devices asked for from now on. */
void agx_model_set_debug_layer(int on);

/* What agx_model_device() returns: the wrapper of `device` when the layer is
 * on (one per process, as the base device), else `device` itself. */
id agx_model_debug_wrap_device(id device);

/* The model's own object under any wrappers (`obj` itself when unwrapped):
 * what the driver's internal paths work on. */
id agx_model_debug_base(id obj);

/* Forwarding, shared with the model's MPS image (model_images.c): a wrapper
 * keeps the wrapped object in its first ivar word. The forwarder for a
 * method type encoding sends the same selector with the same arguments to
 * that object (an IMP of the swizzle engine's shapes), or NULL when no shape
 * fits. */
IMP agx_model_forwarder(const char *types);
/* Add a forwarder to `wrapper` for every instance method of `base` and its
 * superclasses (roots excepted) that `wrapper` does not implement itself and
 * that `skip` (NULL-terminated selector names, may be NULL) does not name.
 * Returns how many were added; a method no shape fits is reported on stderr
 * and left out (a message to it then fails loudly). */
int agx_model_add_forwarders(Class wrapper, Class base, const char *const *skip);

#endif
