/* wakeup.c: agxguard._C.Wakeup, the handoff the Batcher's threads wait on.
 *
 * A Wakeup is an auto-reset event (agx_event): set() by one thread, wait()ed
 * on by another with the GIL released. It exists for the handoff costs that a
 * _thread lock cannot avoid on many-core (virtual) machines:
 *
 * - the waiter spins for up to spin_us before it sleeps, so a result that
 *   comes within that time reaches it without a futex wake (on a VM, waking an
 *   idle virtual CPU costs tens of microseconds);
 * - having seen its event set, a waiter must take the GIL back. If eight
 *   waiters do that at once, seven sleep on the GIL's condition variable and
 *   are woken one by one, each wake as costly as the one avoided above. So
 *   waiters pass a gate first: a thread that got the GIL back through wait()
 *   holds the gate until its next wait() has released the GIL again, and the
 *   next waiter spins for the gate, then finds the GIL free. A gate holder that
 *   does not come back within GATE_NS (it went on to other work) loses the gate
 *   to the next waiter, so the gate only orders, it never blocks for long.
 *
 * Both spins run only while a spinning slot is free (fewer spinners than the
 * thread's usable CPUs less two); otherwise the waiter sleeps at once, as a
 * _thread lock would. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>

#include "acquire.h"
#include "event.h"
#include "spin.h"
#include "wakeup.h"

#define GATE_NS (200 * 1000LL)

static _Atomic uintptr_t gate; /* the thread that took the GIL last through wait(), or 0 */

static void gate_leave(void) {
    uintptr_t me = agx_thread_id();
    atomic_compare_exchange_strong(&gate, &me, 0);
}

static int take_gate(void *unused) {
    uintptr_t cur = atomic_load_explicit(&gate, memory_order_relaxed);
    return cur == 0 && atomic_compare_exchange_weak(&gate, &cur, agx_thread_id());
}

static void gate_enter(void) {
    uintptr_t me = agx_thread_id(), cur = 0;
    if (atomic_compare_exchange_strong(&gate, &cur, me) || cur == me) return;
    /* No CPU to spin on, or the holder went elsewhere: take it over and go for
     * the GIL like anyone. */
    if (!agx_spin_slotted(take_gate, NULL, GATE_NS)) atomic_store(&gate, me);
}

typedef struct {
    PyObject_HEAD
    agx_event ev;
    int64_t spin_ns;
} WakeupObject;

static int Wakeup_init(WakeupObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"spin_us", NULL};
    double spin_us = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|d:Wakeup", kwlist, &spin_us)) return -1;
    if (!(spin_us >= 0) || !isfinite(spin_us) || spin_us > 1e6) {
        PyObject *v = PyFloat_FromDouble(spin_us);
        if (v) {
            PyErr_Format(PyExc_ValueError, "spin_us must be a number from 0 to 1000000 (1 s), not %R", v);
            Py_DECREF(v);
        }
        return -1;
    }
    agx_event_init(&self->ev);
    self->spin_ns = (int64_t)(spin_us * 1000.0);
    return 0;
}

static PyObject *Wakeup_set(WakeupObject *self, PyObject *unused) {
    agx_event_set(&self->ev);
    Py_RETURN_NONE;
}

static PyObject *Wakeup_clear(WakeupObject *self, PyObject *unused) {
    return PyBool_FromLong(agx_event_consume(&self->ev));
}

static PyObject *Wakeup_is_set(WakeupObject *self, PyObject *unused) {
    return PyBool_FromLong(atomic_load(&self->ev.state) != 0);
}

static PyObject *Wakeup_wait(WakeupObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "wait(timeout=None, spin_us=None) takes at most two arguments");
        return NULL;
    }
    int64_t timeout_ns = -1;
    if (nargs >= 1 && args[0] != Py_None) {
        double t = PyFloat_AsDouble(args[0]);
        if (t == -1.0 && PyErr_Occurred()) return NULL;
        if (!(t >= 0) || isnan(t)) {
            PyErr_Format(PyExc_ValueError, "timeout must be None or a number of seconds >= 0, not %R", args[0]);
            return NULL;
        }
        timeout_ns = t > 9e9 ? -1 : (int64_t)(t * 1e9);
    }
    int64_t spin = self->spin_ns;
    if (nargs == 2 && args[1] != Py_None) {
        double us = PyFloat_AsDouble(args[1]);
        if (us == -1.0 && PyErr_Occurred()) return NULL;
        if (!(us >= 0) || us > 1e6) {
            PyErr_Format(PyExc_ValueError, "spin_us must be None or a number from 0 to 1000000, not %R", args[1]);
            return NULL;
        }
        spin = (int64_t)(us * 1000.0);
    }
    if (agx_event_consume(&self->ev)) Py_RETURN_TRUE; /* set already: keep the GIL */
    if (timeout_ns == 0) Py_RETURN_FALSE;
    int got = agx_wakeup_wait(&self->ev, timeout_ns < 0 ? -1 : agx_now_ns() + timeout_ns, spin);
    if (got < 0) return NULL;
    return PyBool_FromLong(got);
}

int agx_wakeup_wait(agx_event *e, int64_t deadline_ns, int64_t spin_ns) {
    return agx_wakeup_wait_then(e, deadline_ns, spin_ns, NULL, NULL);
}

int agx_wakeup_wait_then(agx_event *e, int64_t deadline_ns, int64_t spin_ns, void (*released)(void *), void *arg) {
    for (;;) {
        int64_t slice = agx_now_ns() + AGX_SLICE_NS;
        if (deadline_ns >= 0 && deadline_ns < slice) slice = deadline_ns;
        int got;
        PyThreadState *ts = PyEval_SaveThread();
        gate_leave();
        if (released) {
            released(arg);
            released = NULL;
        }
        got = agx_event_wait_until(e, slice, spin_ns);
        if (got) gate_enter();
        PyEval_RestoreThread(ts);
        if (got) return 1;
        spin_ns = 0; /* spin once per wait, not once per slice */
        if (PyErr_CheckSignals() < 0) return -1;
        if (deadline_ns >= 0 && agx_now_ns() >= deadline_ns) return 0;
    }
}

static PyObject *Wakeup_get_spin_us(WakeupObject *self, void *unused) {
    return PyFloat_FromDouble((double)self->spin_ns / 1000.0);
}

static PyObject *Wakeup_repr(WakeupObject *self) {
    return PyUnicode_FromFormat("<agxguard._C.Wakeup %s spin_us=%lld>",
                                atomic_load(&self->ev.state) ? "set" : "clear",
                                (long long)(self->spin_ns / 1000));
}

static PyMethodDef Wakeup_methods[] = {
    {"set", (PyCFunction)Wakeup_set, METH_NOARGS, "Set it (wakes the waiter, if any)."},
    {"clear", (PyCFunction)Wakeup_clear, METH_NOARGS, "Clear it; True if it was set."},
    {"is_set", (PyCFunction)Wakeup_is_set, METH_NOARGS, "True if set (a wait would return at once)."},
    {"wait", (PyCFunction)(void (*)(void))Wakeup_wait, METH_FASTCALL,
     "wait(timeout=None, spin_us=None) -> bool: wait until set, then clear it and return True;\n"
     "False when timeout (seconds) passed first. spin_us overrides the spin for this wait.\n"
     "The GIL is released while waiting; signal handlers run."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Wakeup_getset[] = {
    {"spin_us", (getter)Wakeup_get_spin_us, NULL, "How long a wait spins before it sleeps.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WakeupType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agxguard._C.Wakeup",
    .tp_basicsize = sizeof(WakeupObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Wakeup(spin_us=0): an auto-reset event for handing work between threads.\n\n"
              "set() sets it; wait() returns once it is set and clears it. A waiter spins\n"
              "up to spin_us (while a CPU is free for it) before it sleeps, and waiters take\n"
              "the GIL back one at a time.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Wakeup_init,
    .tp_repr = (reprfunc)Wakeup_repr,
    .tp_methods = Wakeup_methods,
    .tp_getset = Wakeup_getset,
};

int agx_wakeup_add_to_module(PyObject *m) {
    if (PyType_Ready(&WakeupType) < 0) return -1;
    return PyModule_AddObjectRef(m, "Wakeup", (PyObject *)&WakeupType);
}
