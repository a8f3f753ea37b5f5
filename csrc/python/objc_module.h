/* objc_module.h: the Objective-C part of agxguard._C (the swizzle engine and
 * the AGX hook set), compiled only when an Objective-C runtime is present. */
#ifndef AGX_OBJC_MODULE_H
#define AGX_OBJC_MODULE_H

#include <Python.h>

/* Adds the swizzle and hook-set functions to the module `m`.
 * Returns 0, or -1 with a Python exception set. */
int agx_objc_add_to_module(PyObject *m);

#endif
