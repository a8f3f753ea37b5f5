/* discovery.h: find the driver's concrete classes by making a device, a
 * command queue, a command buffer and each kind of encoder and asking for
 * their classes (Metal on macOS, the driver model anywhere). */
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
    AGX_ROLE_COUNT
} agx_role;
extern const char *const agx_role_names[AGX_ROLE_COUNT];

#define AGX_MAX_ROLE_CLASSES 4

typedef struct agx_discovery {
    int driver;
    char device_class[128];
    Class classes[AGX_ROLE_COUNT][AGX_MAX_ROLE_CLASSES];
    int n[AGX_ROLE_COUNT];
    char notes[AGX_ROLE_COUNT][160]; /* why a role has no class, or what was tried */
} agx_discovery;

/* Whether this build can reach Metal at all (macOS only). */
int agx_metal_supported(void);

/* Fill `out` for `driver`. 0, or -1 with err saying why (no device, not an
 * Apple GPU, the model could not be made). Creates and ends one encoder of
 * each kind; call before hooking. */
int agx_discover(int driver, agx_discovery *out, char *err, size_t errlen);

#endif
