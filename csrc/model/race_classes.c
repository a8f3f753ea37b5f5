/* race_classes.c: Objective-C fixtures of agxguard._model (tests only):
 * classes with a planted read-modify-write race to guard, the swizzle
 * engine's shape probes (class AGXShapeProbe, built by the engine's
 * self-check and reached through the C API), and runtime introspection
 * (the implementation a class resolves, the root classes). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sched.h>
#include <stdio.h>

#include "model_capi.h"
#include "model_module.h"
#include "objc_compat.h"
#include "start_gate.h"

/* ------------------------------------------------------- shape probes */

static PyObject *py_swizzle_host_abi(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(agx_model_capi->swizzle_host_abi());
}

static PyObject *py_swizzle_probes(PyObject *self, PyObject *unused) {
    size_t n = agx_model_capi->swizzle_shape_count();
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(ss)", agx_model_capi->swizzle_shape_key(i), agx_model_capi->swizzle_probe_selector(i));
        if (!t) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *py_swizzle_probe_call(PyObject *self, PyObject *args) {
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "n:swizzle_probe_call", &i)) return NULL;
    char err[256];
    int r;
    Py_BEGIN_ALLOW_THREADS r = agx_model_capi->swizzle_probe_call((size_t)i, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (r < 0) return PyUnicode_FromString(err);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------- introspection */

static PyObject *py_objc_method_imp(PyObject *self, PyObject *args) {
    const char *cls, *sel;
    if (!PyArg_ParseTuple(args, "ss:objc_method_imp", &cls, &sel)) return NULL;
    Class c = objc_getClass(cls);
    if (!c) { PyErr_Format(PyExc_ValueError, "no Objective-C class named %s", cls); return NULL; }
    Method m = class_getInstanceMethod(c, sel_registerName(sel));
    if (!m) { PyErr_Format(PyExc_ValueError, "-[%s %s]: no such instance method", cls, sel); return NULL; }
    return PyLong_FromVoidPtr((void *)method_getImplementation(m));
}

/* Every root class in the runtime, with whether it answers +initialize:
 * Apple's runtime sends that to each class on first use, and a root class
 * without it crashes there (objc_compat.h, agx_objc_new_root_class). */
static PyObject *py_objc_root_classes(PyObject *self, PyObject *unused) {
    int n = objc_getClassList(NULL, 0);
    Class *all = n > 0 ? PyMem_Calloc((size_t)n, sizeof(Class)) : NULL;
    if (n > 0 && !all) return PyErr_NoMemory();
    n = all ? objc_getClassList(all, n) : 0;
    PyObject *d = PyDict_New();
    SEL init = sel_registerName("initialize");
    for (int i = 0; d && i < n; i++) {
        if (!all[i] || class_getSuperclass(all[i])) continue;
        PyObject *yes = class_getClassMethod(all[i], init) ? Py_True : Py_False;
        if (PyDict_SetItemString(d, class_getName(all[i]), yes) < 0) Py_CLEAR(d);
    }
    PyMem_Free(all);
    return d;
}

/* ------------------------------------------------- race classes (tests) */
/* A class with a deliberate read-modify-write race in -increment, made at
 * run time so tests can guard a class of their own. */

typedef struct race_ivars { volatile uint64_t value; uint64_t step; } race_ivars;
#define MAX_RACE_CLASSES 32
static struct { Class cls; uint64_t step; } race_classes[MAX_RACE_CLASSES];
static int n_race_classes;

static void race_increment(id self, SEL cmd) {
    race_ivars *r = object_getIndexedIvars(self);
    uint64_t v = r->value;
    sched_yield(); /* widens the window between the read and the write */
    r->value = v + r->step;
}
static uint64_t race_value(id self, SEL cmd) { return ((race_ivars *)object_getIndexedIvars(self))->value; }
static void race_odd(id self, SEL cmd) {}

static PyObject *py_make_race_class(PyObject *self, PyObject *args) {
    const char *name;
    unsigned long long step = 1;
    if (!PyArg_ParseTuple(args, "s|K:objc_make_race_class", &name, &step)) return NULL;
    if (objc_getClass(name)) { PyErr_Format(PyExc_ValueError, "class %s already exists", name); return NULL; }
    if (n_race_classes >= MAX_RACE_CLASSES) { PyErr_SetString(PyExc_RuntimeError, "too many race classes"); return NULL; }
    Class c = agx_objc_new_root_class(name);
    if (!c) { PyErr_Format(PyExc_RuntimeError, "the runtime refused class %s", name); return NULL; }
    class_addMethod(c, sel_registerName("increment"), (IMP)race_increment, "v@:");
    class_addMethod(c, sel_registerName("value"), (IMP)race_value, "Q@:");
    /* a shape no wrapper forwards exactly: {int, char} by value */
    class_addMethod(c, sel_registerName("oddShape:"), (IMP)race_odd, "v@:{AGXOdd=ic}");
    objc_registerClassPair(c);
    char sub[256];
    snprintf(sub, sizeof sub, "%sSub", name);
    Class s = objc_allocateClassPair(c, sub, 0);
    if (s) objc_registerClassPair(s);
    /* One message so the GNU runtime installs the class's dispatch table now
     * (as any class in use has had); until then lookups see a prepared copy. */
    {
        id tmp = class_createInstance(c, sizeof(race_ivars));
        SEL v = sel_registerName("value");
        ((uint64_t(*)(id, SEL))agx_objc_lookup(tmp, v))(tmp, v);
    }
    race_classes[n_race_classes].cls = c;
    race_classes[n_race_classes].step = step;
    n_race_classes++;
    Py_RETURN_NONE;
}

typedef struct race_job { id obj; int iterations; agx_gate *start; } race_job;

static void *race_thread(void *arg) {
    race_job *j = arg;
    SEL inc = sel_registerName("increment");
    agx_gate_wait(j->start);
    for (int i = 0; i < j->iterations; i++) ((void (*)(id, SEL))agx_objc_lookup(j->obj, inc))(j->obj, inc);
    return NULL;
}

static PyObject *py_race_run(PyObject *self, PyObject *args) {
    const char *name;
    int threads, iterations;
    if (!PyArg_ParseTuple(args, "sii:objc_race_run", &name, &threads, &iterations)) return NULL;
    Class c = objc_getClass(name);
    if (!c) { PyErr_Format(PyExc_ValueError, "no Objective-C class named %s", name); return NULL; }
    if (threads < 1 || threads > 64) { PyErr_SetString(PyExc_ValueError, "threads must be 1..64"); return NULL; }
    uint64_t step = 0;
    for (Class k = c; k && !step; k = class_getSuperclass(k))
        for (int i = 0; i < n_race_classes; i++)
            if (race_classes[i].cls == k) step = race_classes[i].step;
    if (!step) { PyErr_Format(PyExc_ValueError, "%s is not a race class", name); return NULL; }
    id obj = class_createInstance(c, sizeof(race_ivars));
    race_ivars *r = object_getIndexedIvars(obj);
    r->value = 0;
    r->step = step;
    pthread_t ts[64];
    race_job job;
    agx_gate start;
    Py_BEGIN_ALLOW_THREADS
    agx_gate_init(&start, threads);
    job.obj = obj, job.iterations = iterations, job.start = &start;
    for (int t = 0; t < threads; t++) pthread_create(&ts[t], NULL, race_thread, &job);
    for (int t = 0; t < threads; t++) pthread_join(ts[t], NULL);
    agx_gate_destroy(&start);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(r->value);
}
static PyMethodDef race_methods[] = {
    {"swizzle_host_abi", py_swizzle_host_abi, METH_NOARGS, "swizzle_host_abi() -> this build's calling convention."},
    {"swizzle_probes", py_swizzle_probes, METH_NOARGS,
     "swizzle_probes() -> [(shape_key, selector)] of class AGXShapeProbe, one per shape."},
    {"swizzle_probe_call", py_swizzle_probe_call, METH_VARARGS,
     "swizzle_probe_call(i) -> None if shape i forwarded exactly, else the error text."},
    {"objc_method_imp", py_objc_method_imp, METH_VARARGS,
     "objc_method_imp(class_name, selector) -> int: the address of the implementation the class resolves."},
    {"objc_root_classes", py_objc_root_classes, METH_NOARGS,
     "objc_root_classes() -> {name: answers +initialize} for every root class in the runtime."},
    {"objc_make_race_class", py_make_race_class, METH_VARARGS,
     "objc_make_race_class(name, step=1): a class whose -increment races (and <name>Sub)."},
    {"objc_race_run", py_race_run, METH_VARARGS,
     "objc_race_run(class_name, threads, iterations) -> final value (native threads)."},
    {NULL, NULL, 0, NULL},
};

int agx_race_classes_add_to_module(PyObject *m) { return PyModule_AddFunctions(m, race_methods); }
