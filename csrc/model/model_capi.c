/* model_capi.c: see model_capi.h. */
#include "model_capi.h"

#include <stdio.h>

const agx_capi *agx_model_capi;

#ifdef AGX_HAVE_OBJC
#include "discovery.h"
#include "driver_model.h"
#include "model_images.h"

/* What the product's discovery knows of the model (discovery.h). Filled at
 * registration: the class names are variables, not constant expressions. */
static agx_driver_provider provider;
#endif

int agx_model_use_capi(const agx_capi *c, char *err, size_t errlen) {
    if (!c || c->version != AGX_CAPI_VERSION || c->size < sizeof(agx_capi)) {
        snprintf(err, errlen,
                 "agxguard._C's C API is version %d (%zu bytes); agxguard._model was built for version %d (%zu "
                 "bytes): rebuild both from one checkout",
                 c ? c->version : -1, c ? c->size : (size_t)0, AGX_CAPI_VERSION, sizeof(agx_capi));
        return -1;
    }
    agx_model_capi = c;
#ifndef AGX_HAVE_OBJC
    return 0; /* the measuring fixtures only: no model to register */
#else
    if (!c->set_driver_provider || !c->hooks_install || !c->swizzle_shape_for) {
        agx_model_capi = NULL;
        snprintf(err, errlen, "agxguard._C was built without an Objective-C runtime: the driver model needs one");
        return -1;
    }
    provider.name = "the driver model";
    provider.device = agx_model_device;
    provider.command_buffers_owned = 1; /* the model's commandBuffer hands out an owned buffer */
    provider.named_command_buffer_class = agx_model_mps_cmdbuf_class;
    provider.named_class_image = "the model's mps image, standing in for MPSCommandBuffer,";
    provider.add_image_func = agx_model_add_image_func;
    provider.image_mechanism = "the driver model's image loader";
    if (c->set_driver_provider(AGX_DRIVER_MODEL, &provider) < 0) {
        snprintf(err, errlen, "agxguard._C refused the driver model as the provider of driver 'model'");
        return -1;
    }
    return 0;
#endif
}
