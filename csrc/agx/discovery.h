/* discovery.h: find the driver's concrete classes by making a device, a
 * command queue, a command buffer and each kind of encoder and asking for
 * their classes (Metal on macOS, the driver model anywhere); find the classes
 * known by name (MetalPerformanceShaders' command buffer) again whenever new
 * images load.
 *
 * Layers: under Metal API validation or frame capture (MTL_DEBUG_LAYER=1,
 * Xcode) every object the application gets is a wrapper whose `baseObject` is
 * the driver's own object. Discovery follows `baseObject` down and records
 * both the wrapper classes (what the application calls) and the AGX classes
 * under them (what the wrappers and the driver's internal paths call).
 *
 * Ownership: discovery releases everything it owns (new*, Create, Copy
 * results; the driver model's command buffer) and, on Apple, drains an
 * autorelease pool pushed before the first object is made.
 *
 * Providers: Metal is the system's; the driver model is not part of the
 * product (agxguard._model builds it) and registers itself here when it
 * loads (agx_discovery_set_provider, reached through the capsule of capi.h).
 * Until it has, the "model" driver is not there to be discovered. */
#ifndef AGX_DISCOVERY_H
#define AGX_DISCOVERY_H

#include <stddef.h>

#include "objc_compat.h"

enum { AGX_DRIVER_NONE = 0, AGX_DRIVER_METAL = 1, AGX_DRIVER_MODEL = 2 };
extern const char *const agx_driver_names[3]; /* NULL, "metal", "model" */

typedef enum {
    AGX_ROLE_QUEUE = 0,
    AGX_ROLE_COMMAND_BUFFER,
    AGX_ROLE_MPS_COMMAND_BUFFER,
    AGX_ROLE_COMPUTE_ENCODER,
    AGX_ROLE_BLIT_ENCODER,
    AGX_ROLE_RENDER_ENCODER,          /* render encoders, and a parallel one's sub-encoders */
    AGX_ROLE_PARALLEL_RENDER_ENCODER,
    AGX_ROLE_RESOURCE_STATE_ENCODER,
    AGX_ROLE_ACCEL_STRUCT_ENCODER,    /* acceleration-structure encoders */
    AGX_ROLE_COUNT
} agx_role;
extern const char *const agx_role_names[AGX_ROLE_COUNT];

/* Per role: the driver's classes plus their wrappers under a debug layer. */
#define AGX_MAX_ROLE_CLASSES 8
/* How many wrapper layers are followed down through `baseObject`. */
#define AGX_MAX_LAYERS 4

typedef struct agx_discovery {
    int driver;
    char device_class[128];      /* the device's class as the application sees it */
    char base_device_class[128]; /* the driver's own device class under any layers (same without them) */
    int layers;                  /* wrapper layers above the driver's objects (0: none) */
    Class classes[AGX_ROLE_COUNT][AGX_MAX_ROLE_CLASSES];
    int n[AGX_ROLE_COUNT];
    char notes[AGX_ROLE_COUNT][160]; /* why a role has no class, or what was tried */
    char how[96];                    /* how the device was obtained */
} agx_discovery;

/* A driver that registers itself instead of being found in the system (the
 * driver model): what discovery and image watching need of it. Static: the
 * provider must outlive the process's hooks. */
typedef struct agx_driver_provider {
    const char *name;                /* for discovery's `how`: "the driver model" */
    id (*device)(void);              /* its device, not owned by the caller; NULL if none can be made */
    int command_buffers_owned;       /* commandBuffer hands out an owned (+1) object */
    const char *named_command_buffer_class; /* its stand-in for MPSCommandBuffer, found by name */
    const char *named_class_image;   /* what loads that class, for the note when it is missing */
    /* its image loader: `fn` is called for every image already loaded, then
     * for each later load, in the context agx_watch_images describes */
    void (*add_image_func)(void (*fn)(const char *image));
    const char *image_mechanism;     /* the loader's name, for status() */
} agx_driver_provider;

/* Register `p` (NULL: none) as AGX_DRIVER_MODEL's provider. 0, or -1 for
 * another driver (Metal is the system's). */
int agx_discovery_set_provider(int driver, const agx_driver_provider *p);
/* Whether `driver` can be discovered now: Metal where this build reaches it,
 * the model once its provider is registered. */
int agx_driver_present(int driver);

/* Whether this build can reach Metal at all (macOS only). */
int agx_metal_supported(void);

/* The class names of the Metal devices present (MTLCopyAllDevices), at most
 * `max`; returns how many there are (0 off macOS). For the import-time
 * warning: a Mac with a GPU but no hooks. */
int agx_metal_devices(char (*names)[128], int max);

/* Fill `out` for `driver`. 0, or -1 with err saying why (no device, not an
 * Apple GPU, the model could not be made). Creates and ends one encoder of
 * each kind and releases what it made; call before hooking. Includes
 * agx_discover_named. */
int agx_discover(int driver, agx_discovery *out, char *err, size_t errlen);

/* Add the classes found by name (MPSCommandBuffer; the model's stand-in)
 * that are not in `d` yet; returns how many were added. Makes no object.
 * Takes the runtime's lock: never call it from an image-load callback. */
int agx_discover_named(agx_discovery *d);

/* Image loading: have `fn` called whenever the process loads new images,
 * through the platform's mechanism for `driver` (Apple: the Objective-C
 * runtime's objc_addLoadImageFunc, else dyld's
 * _dyld_register_func_for_add_image; the driver model: its own loader).
 * `fn` may run with the runtime's (or dyld's) lock held, on whichever thread
 * loads the image: it must not call the runtime or take locks that a thread
 * calling the runtime may hold. Once per driver; returns the mechanism's
 * name, or NULL when the driver has none. */
const char *agx_watch_images(int driver, void (*fn)(void));

#endif
