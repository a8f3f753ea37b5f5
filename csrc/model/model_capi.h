/* model_capi.h: how the driver model and the lab's fixtures reach the
 * product. agxguard._model links nothing of agxguard._C: every call into the
 * product goes through the table of capi.h, which _model imports from the
 * capsule agxguard._C._capi at init (model_module.c) and the static
 * ThreadSanitizer build passes directly (csrc/tests/tsan_model.c). */
#ifndef AGX_MODEL_CAPI_H
#define AGX_MODEL_CAPI_H

#include <stddef.h>

#include "capi.h"

/* The product's table; NULL until agx_model_use_capi succeeded. */
extern const agx_capi *agx_model_capi;

/* Check `c` (its version and size against the ones this module was built
 * with), keep it, and (with an Objective-C runtime) register the driver
 * model with the product's discovery as the provider of the "model" driver.
 * 0, or -1 with err. */
int agx_model_use_capi(const agx_capi *c, char *err, size_t errlen);

#endif
