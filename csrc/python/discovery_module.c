/* discovery_module.c: Python bindings for rediscovery, image-load watching and
 * Metal's device list (added to agxguard._C by agx_objc_add_to_module). The
 * driver model's images, debug layer and live-object counts are
 * agxguard._model's (csrc/model/model_module.c). */
#ifdef AGX_HAVE_OBJC /* the whole file: built only with an Objective-C runtime */
#include "discovery_module.h"

#include <string.h>

#include "discovery.h"
#include "hook_table.h"

static PyObject *py_hooks_rediscover(PyObject *self, PyObject *unused) {
    char err[256] = "";
    int n;
    Py_BEGIN_ALLOW_THREADS n = agx_hooks_rediscover(err, sizeof err);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_hooks_images(PyObject *self, PyObject *unused) {
    agx_hooks_image_stats s;
    agx_hooks_images(&s);
    return Py_BuildValue("{s:z,s:K,s:K,s:K,s:O}", "mechanism", s.mechanism, "events",
                         (unsigned long long)s.events, "rediscoveries", (unsigned long long)s.rediscoveries,
                         "rediscovered_hooks", (unsigned long long)s.rediscovered_hooks, "pending",
                         s.pending ? Py_True : Py_False);
}

static PyObject *py_metal_devices(PyObject *self, PyObject *unused) {
    char names[16][128];
    int n;
    Py_BEGIN_ALLOW_THREADS n = agx_metal_devices(names, 16);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < n && i < 16; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s || PyList_Append(list, s) < 0) { Py_XDECREF(s); Py_CLEAR(list); break; }
        Py_DECREF(s);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"hooks_rediscover", py_hooks_rediscover, METH_NOARGS,
     "hooks_rediscover() -> int: look for classes known by name again and hook those that appeared."},
    {"hooks_images", py_hooks_images, METH_NOARGS,
     "hooks_images() -> {mechanism, events, rediscoveries, rediscovered_hooks, pending}: image-load watching."},
    {"metal_devices", py_metal_devices, METH_NOARGS,
     "metal_devices() -> [class name]: the Metal devices present (MTLCopyAllDevices); [] off macOS."},
    {NULL, NULL, 0, NULL},
};

int agx_discovery_add_to_module(PyObject *m) { return PyModule_AddFunctions(m, methods); }

#endif /* AGX_HAVE_OBJC */
