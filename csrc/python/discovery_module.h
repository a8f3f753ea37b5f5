/* discovery_module.h: the Python side of rediscovery, image-load watching
 * and Metal's device list (discovery_module.c). */
#ifndef AGX_DISCOVERY_MODULE_H
#define AGX_DISCOVERY_MODULE_H

#include <Python.h>

/* Adds its functions to `m`; 0, or -1 with a Python exception set. */
int agx_discovery_add_to_module(PyObject *m);

#endif
