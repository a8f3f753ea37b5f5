/* measure.c: what tests and benchmarks read or switch inside the product,
 * as functions of agxguard._model (the product module exports none of
 * them): the lock's uncontended cost and its heir-seat knobs, the usable
 * CPUs waits spin against, a thread's region depth and use_stream() key, and
 * the object-to-stream table of the swizzle engine (with an Objective-C
 * runtime). All through the C API of agxguard._C (capi.h). Built in every
 * build, so that benchmarks reach the knobs where there is no runtime (the
 * GPU machine builds with AGXGUARD_NO_OBJC=1). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "acquire.h"
#include "model_capi.h"
#include "model_module.h"
#ifdef AGX_HAVE_OBJC
#include "swizzle.h"
#endif

/* ------------------------------------------------------------ the lock */

/* Nanoseconds per uncontended try+release of a fresh lock, in C alone. */
static PyObject *py_c_lock_ns(PyObject *m, PyObject *arg) {
    int overflow = 0;
    long n = PyLong_AsLongAndOverflow(arg, &overflow);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (overflow || n < 1 || n > 1000000000L) {
        PyErr_Format(PyExc_ValueError, "iterations must be an int from 1 to 1000000000, not %R", arg);
        return NULL;
    }
    double ns;
    Py_BEGIN_ALLOW_THREADS ns = agx_model_capi->lock_pair_ns(n);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(ns);
}

/* _set_heir_seat(on) -> previous */
static PyObject *py_set_heir_seat(PyObject *m, PyObject *on) {
    int v = PyObject_IsTrue(on);
    if (v < 0) return NULL;
    return PyBool_FromLong(atomic_exchange(agx_model_capi->heir_seat_on, v));
}

/* _set_heir_spin_us(us) -> previous */
static PyObject *py_set_heir_spin_us(PyObject *m, PyObject *arg) {
    double us = PyFloat_AsDouble(arg);
    if (us == -1.0 && PyErr_Occurred()) return NULL;
    if (!(us >= 0) || us > 1e6) {
        PyErr_Format(PyExc_ValueError, "heir spin must be 0 to 1000000 us, not %R", arg);
        return NULL;
    }
    return PyFloat_FromDouble(
        (double)atomic_exchange(agx_model_capi->heir_spin_ns, (int64_t)(us * 1000.0)) / 1000.0);
}

/* _set_region_wait(name) -> previous: how Python waiters wait for a lock
 * ('watch', 'grace', 'direct'; acquire.h). */
static const char *const region_wait_names[] = {"watch", "grace", "direct"};
static PyObject *py_set_region_wait(PyObject *m, PyObject *arg) {
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "region wait must be a str, one of 'watch', 'grace', 'direct'; not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    for (int i = 0; i < 3; i++)
        if (strcmp(name, region_wait_names[i]) == 0)
            return PyUnicode_FromString(region_wait_names[atomic_exchange(agx_model_capi->region_wait, i)]);
    PyErr_Format(PyExc_ValueError, "unknown region wait %R; allowed: 'watch', 'grace', 'direct'", arg);
    return NULL;
}

/* _set_grace_us(us) -> previous: the 'grace' wait's grace period. */
static PyObject *py_set_grace_us(PyObject *m, PyObject *arg) {
    double us = PyFloat_AsDouble(arg);
    if (us == -1.0 && PyErr_Occurred()) return NULL;
    if (!(us >= 0) || us > 1e6) {
        PyErr_Format(PyExc_ValueError, "grace must be 0 to 1000000 us, not %R", arg);
        return NULL;
    }
    return PyFloat_FromDouble((double)atomic_exchange(agx_model_capi->grace_ns, (int64_t)(us * 1000.0)) / 1000.0);
}

/* _set_claim(on) -> previous: whether the op lock's heir claims it (acquire.c). */
static PyObject *py_set_claim(PyObject *m, PyObject *on) {
    int v = PyObject_IsTrue(on);
    if (v < 0) return NULL;
    return PyBool_FromLong(atomic_exchange(agx_model_capi->claim_on, v));
}

/* _wait_counts(reset=False) -> dict: tallies of Python lock waits (acquire.h). */
static PyObject *py_wait_counts(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    int reset = nargs > 0 ? PyObject_IsTrue(args[0]) : 0;
    if (reset < 0) return NULL;
    agx_wait_counts *c = agx_model_capi->wait_counts;
    PyObject *d = Py_BuildValue("{s:K,s:K,s:K}", "gil_trips", (unsigned long long)atomic_load(&c->gil_trips),
                                "gil_trips_lost", (unsigned long long)atomic_load(&c->gil_trips_lost),
                                "grace_retaken", (unsigned long long)atomic_load(&c->grace_retaken));
    if (d && reset) {
        atomic_store(&c->gil_trips, 0);
        atomic_store(&c->gil_trips_lost, 0);
        atomic_store(&c->grace_retaken, 0);
    }
    return d;
}

static PyObject *py_usable_cpus(PyObject *m, PyObject *unused) {
    return PyLong_FromLong(agx_model_capi->usable_cpus());
}

/* ------------------------------------------------------ regions, streams */

static PyObject *py_region_depth(PyObject *m, PyObject *unused) {
    return PyLong_FromLong(agx_model_capi->region_depth());
}

static PyObject *py_get_thread_stream(PyObject *m, PyObject *unused) {
    uint64_t key;
    if (!agx_model_capi->thread_stream(&key)) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(key);
}

#ifdef AGX_HAVE_OBJC /* the swizzle engine's stream table */
static PyObject *py_set_stream(PyObject *self, PyObject *args) {
    unsigned long long obj, key;
    if (!PyArg_ParseTuple(args, "KK:swizzle_set_stream", &obj, &key)) return NULL;
    if (agx_model_capi->swizzle_set_stream((const void *)(uintptr_t)obj, key) < 0) {
        PyErr_Format(PyExc_ValueError, "swizzle_set_stream: %llu is not an object address (0 and 1 are not)", obj);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_stream_of(PyObject *self, PyObject *args) {
    unsigned long long obj;
    uint64_t key;
    if (!PyArg_ParseTuple(args, "K:swizzle_stream_of", &obj)) return NULL;
    if (!agx_model_capi->swizzle_stream_entry((const void *)(uintptr_t)obj, &key)) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(key);
}

static PyObject *py_clear_stream(PyObject *self, PyObject *args) {
    unsigned long long obj;
    if (!PyArg_ParseTuple(args, "K:swizzle_clear_stream", &obj)) return NULL;
    agx_model_capi->swizzle_clear_stream((const void *)(uintptr_t)obj);
    Py_RETURN_NONE;
}

static PyObject *py_stream_table(PyObject *self, PyObject *unused) {
    agx_stream_table_info t;
    agx_model_capi->swizzle_stream_table(&t);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "entries", (unsigned long long)t.entries, "tombstones",
                         (unsigned long long)t.tombstones, "capacity", (unsigned long long)t.capacity, "bytes",
                         (unsigned long long)t.bytes, "removed", (unsigned long long)t.removed, "grows",
                         (unsigned long long)t.grows, "rehashes", (unsigned long long)t.rehashes);
}
#endif /* AGX_HAVE_OBJC */

static PyMethodDef measure_methods[] = {
    {"c_lock_ns", py_c_lock_ns, METH_O, "c_lock_ns(n): ns per uncontended C try+release of the product's lock."},
    {"_set_heir_seat", py_set_heir_seat, METH_O, "_set_heir_seat(on) -> previous: the product's heir seat (measuring only)."},
    {"_set_heir_spin_us", py_set_heir_spin_us, METH_O,
     "_set_heir_spin_us(us) -> previous: how long the heir spins (measuring only)."},
    {"_set_region_wait", py_set_region_wait, METH_O, "_set_region_wait(name) -> previous (measuring only)."},
    {"_set_claim", py_set_claim, METH_O, "_set_claim(on) -> previous (measuring only)."},
    {"_set_grace_us", py_set_grace_us, METH_O, "_set_grace_us(us) -> previous (measuring only)."},
    {"_wait_counts", (PyCFunction)(void (*)(void))py_wait_counts, METH_FASTCALL,
     "_wait_counts(reset=False) -> tallies of Python lock waits (measuring only)."},
    {"_usable_cpus", py_usable_cpus, METH_NOARGS,
     "_usable_cpus() -> CPUs this thread may use (affinity, capped by a cgroup quota); waits spin\n"
     "only while fewer than this less two threads spin."},
    {"region_depth", py_region_depth, METH_NOARGS, "How many guarded regions this thread is inside."},
    {"get_thread_stream", py_get_thread_stream, METH_NOARGS, "This thread's use_stream() key, or None."},
#ifdef AGX_HAVE_OBJC
    {"swizzle_stream_of", py_stream_of, METH_VARARGS,
     "swizzle_stream_of(object_address) -> the key the stream table has for it, or None."},
    {"swizzle_clear_stream", py_clear_stream, METH_VARARGS,
     "swizzle_clear_stream(object_address): forget its key (as its dealloc does)."},
    {"swizzle_stream_table", py_stream_table, METH_NOARGS,
     "swizzle_stream_table() -> the object-to-stream table's entries, tombstones, capacity, bytes,\n"
     "removed (entries cleared at dealloc), grows and rehashes."},
    {"swizzle_set_stream", py_set_stream, METH_VARARGS,
     "swizzle_set_stream(object_address, key): the stream key a receiver's hooked calls use."},
#endif
    {NULL, NULL, 0, NULL},
};

int agx_measure_add_to_module(PyObject *m) { return PyModule_AddFunctions(m, measure_methods); }
