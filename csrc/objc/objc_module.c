/* objc_module.c: Python bindings for the swizzle engine and the driver model. */
#include "objc_module.h"

int agx_objc_add_to_module(PyObject *m) {
    (void)m;
    return 0;
}
