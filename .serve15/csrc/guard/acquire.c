/* acquire.c: blocking waits for Python and native callers (see acquire.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "acquire.h"
#include "module_state.h"


typedef struct waitable {
    const char *what; /* for messages */
    int (*try_once)(void *);
    /* sleep with the GIL released until the object is seen free (or taken) */
    int (*wait_until)(void *, int64_t);
    /* after a free sighting that did not end in taking it; may be NULL */
    void (*pass_wakeup)(void *);
    /* the heir seat (see lock.h): taken before watching, left after; may be NULL */
    int (*seat)(void *, int64_t);
    void (*leave)(void *);
    int (*claim)(void *); /* the heir claims the lock after CLAIM_NS; may be NULL */
    void (*note_wait)(void *, int64_t);
    void (*note_timeout)(void *);
} waitable;

static int lock_try(void *o) { return agx_lock_try(o); }
_Atomic int agx_heir_seat_on = 1;
_Atomic int64_t agx_heir_spin_ns = 200000;
static int lock_wait_free(void *o, int64_t d) {
    return atomic_load_explicit(&agx_heir_seat_on, memory_order_relaxed)
               ? agx_lock_watch_until(o, d, atomic_load_explicit(&agx_heir_spin_ns, memory_order_relaxed))
               : agx_lock_wait_free_until(o, d);
}
static void lock_pass(void *o) { agx_lock_pass_wakeup(o); }
static int lock_seat(void *o, int64_t d) { return agx_lock_heir_wait_until(o, d); }
static void lock_leave(void *o) { agx_lock_heir_leave(o); }
static int lock_claim(void *o) { return agx_lock_claim(o); }
static void lock_note(void *o, int64_t w) { agx_lock_note_wait(o, w); }
static void lock_timeout(void *o) { agx_lock_note_timeout(o); }
static int sem_try(void *o) { return agx_sem_try(o); }
static int sem_wait(void *o, int64_t d) { return agx_sem_wait_until(o, d); }
static void sem_note(void *o, int64_t w) { agx_sem_note_wait(o, w); }
static void sem_timeout(void *o) { agx_sem_note_timeout(o); }

/* A Python waiter only watches the lock with the GIL released and takes it
 * after getting the GIL back, so it never holds the lock while it waits for the
 * GIL: the holder's critical section does not grow by a GIL handoff. Only one
 * Python waiter at a time watches (the heir, lock.h), so a release sends one
 * thread to the GIL, not all of them. */
static const waitable LOCK_OPS = {"lock", lock_try, lock_wait_free, lock_pass, lock_seat, lock_leave,
                                  lock_claim, lock_note, lock_timeout};
static const waitable SEM_OPS = {"throttle", sem_try, sem_wait, NULL, NULL, NULL, NULL, sem_note, sem_timeout};

/* A holder that keeps the GIL between its guarded calls takes the lock again
 * before the heir can get the GIL to take it; after watching this long the
 * heir claims the lock (lock.h), as CPython's GIL forces a switch after its
 * interval. Counted from when it became heir, not from when it began to wait:
 * a waiter that slept long on the seat must not claim at once, or the lock
 * would change hands after every hold, each time at the price of GIL handoffs. */
#define CLAIM_NS (5 * 1000000LL)

static void abort_on_timeout(const char *name, int64_t waited_ns) {
    fprintf(stderr,
            "agxguard: waited %lld ms for the '%s' lock, past the timeout; aborting "
            "(AGXGUARD_LOCK_TIMEOUT_MS, timeout action 'abort')\n",
            (long long)(waited_ns / 1000000), name);
    fflush(stderr);
    abort();
}

static int block_py(void *obj, const char *name, const waitable *w) {
    if (w->try_once(obj)) return 0; /* once with the GIL held, as CPython's locks do */
    int64_t start = agx_now_ns();
    int64_t warn = atomic_load(&agx_wait.warn_ns);
    int64_t timeout = atomic_load(&agx_wait.timeout_ns);
    int warned = 0, claimed = w->claim == NULL;
    int64_t heir_since = -1; /* when this waiter got the heir seat */
    for (;;) {
        int64_t now = agx_now_ns();
        int64_t deadline = now + AGX_SLICE_NS;
        if (!claimed && heir_since >= 0 && now < heir_since + CLAIM_NS && heir_since + CLAIM_NS < deadline)
            deadline = heir_since + CLAIM_NS;
        if (timeout > 0 && start + timeout < deadline) deadline = start + timeout;
        if (warn > 0 && !warned && start + warn < deadline) deadline = start + warn;
        int seen;
        Py_BEGIN_ALLOW_THREADS
        seen = 0;
        if (w->seat == NULL || !atomic_load_explicit(&agx_heir_seat_on, memory_order_relaxed) ||
            w->seat(obj, deadline)) {
            if (!claimed) {
                int64_t t = agx_now_ns();
                if (heir_since < 0)
                    heir_since = t;
                else if (t - heir_since >= CLAIM_NS)
                    claimed = w->claim(obj); /* the heir, watching in vain for CLAIM_NS */
            }
            seen = w->wait_until(obj, deadline);
        }
        Py_END_ALLOW_THREADS
        int64_t waited = agx_now_ns() - start;
        if (seen && (w->pass_wakeup == NULL || w->try_once(obj))) {
            if (w->leave) w->leave(obj);
            w->note_wait(obj, waited);
            return 0;
        }
        if (seen) w->pass_wakeup(obj); /* lost the race: another waiter may take it */
        if (PyErr_CheckSignals() < 0) goto fail;
        if (warn > 0 && !warned && waited >= warn) {
            warned = 1;
            if (PyErr_WarnFormat(agx_LockWaitWarning, 1,
                                 "agxguard: waited %lld ms for the '%s' %s (warn threshold %lld ms)",
                                 (long long)(waited / 1000000), name, w->what,
                                 (long long)(warn / 1000000)) < 0)
                goto fail;
        }
        if (timeout > 0 && waited >= timeout) {
            w->note_timeout(obj);
            if (atomic_load(&agx_wait.timeout_aborts)) abort_on_timeout(name, waited);
            PyErr_Format(agx_LockTimeout,
                         "agxguard: gave up on the '%s' %s after %lld ms (timeout %lld ms)", name,
                         w->what, (long long)(waited / 1000000), (long long)(timeout / 1000000));
            goto fail;
        }
    }
fail:
    if (w->leave) w->leave(obj); /* the seat goes to the next waiter */
    return -1;
}

int agx_acquire_py(agx_lock *l) { return block_py(l, l->name, &LOCK_OPS); }

int agx_throttle_acquire_py(void) { return block_py(agx_throttle(), "throttle", &SEM_OPS); }

#if PY_VERSION_HEX >= 0x030D0000
#define AGX_FINALIZING() Py_IsFinalizing()
#else
#define AGX_FINALIZING() _Py_IsFinalizing()
#endif

/* A hooked driver call cannot fail (many are void Objective-C methods) and
 * must not run without its lock, so a native wait ends only by taking the lock
 * or by ending the process: past the timeout under either action (a driver
 * call has no way to raise), and when Python's signal handlers raise (Ctrl-C)
 * while the main thread waits in a driver call: KeyboardInterrupt ends the
 * process as SIGINT does, anything else with abort(). */
static void end_native_wait(const char *name, int64_t waited_ns, const char *why, int sigint) {
    fprintf(stderr,
            "agxguard: a driver call waited %lld ms for the '%s' lock and %s; a driver call cannot "
            "raise and must not run unlocked, so the process ends here\n",
            (long long)(waited_ns / 1000000), name, why);
    fflush(stderr);
    if (sigint) {
        signal(SIGINT, SIG_DFL);
        raise(SIGINT);
    }
    abort();
}

/* Between slices of a native wait: run Python's signal handlers if this is
 * the main thread (the only one that runs them). Returns 0 once the thread is
 * known not to be the main one (no more checks needed), else 1. */
static int native_check_signals(PyThreadState **ts, agx_lock *l, int64_t start) {
    if (AGX_FINALIZING()) return 0;
    PyGILState_STATE g = PyGILState_UNLOCKED;
    if (*ts)
        PyEval_RestoreThread(*ts);
    else
        g = PyGILState_Ensure();
    int main_thread = _PyOS_IsMainThread();
    if (main_thread && PyErr_CheckSignals() < 0) {
        int kbd = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        end_native_wait(l->name, agx_now_ns() - start,
                        kbd ? "was interrupted (KeyboardInterrupt)" : "a signal handler raised", kbd);
    }
    if (*ts)
        *ts = PyEval_SaveThread();
    else
        PyGILState_Release(g);
    return main_thread;
}

void agx_acquire_native(agx_lock *l) {
    if (agx_lock_try(l)) return;
    PyThreadState *ts = NULL;
    int reachable = 0; /* a thread of Python's, which may run its signal handlers */
    if (Py_IsInitialized() && !AGX_FINALIZING()) {
        if (PyGILState_Check())
            ts = PyEval_SaveThread();
        reachable = ts != NULL || PyGILState_GetThisThreadState() != NULL;
    }
    int64_t start = agx_now_ns();
    int64_t warn = atomic_load(&agx_wait.warn_ns);
    int64_t timeout = atomic_load(&agx_wait.timeout_ns);
    int warned = 0;
    for (;;) {
        int64_t deadline = reachable ? agx_now_ns() + AGX_SLICE_NS : -1;
        if (warn > 0 && !warned && (deadline < 0 || start + warn < deadline)) deadline = start + warn;
        if (timeout > 0 && (deadline < 0 || start + timeout < deadline)) deadline = start + timeout;
        if (agx_lock_wait_until(l, deadline)) break;
        int64_t waited = agx_now_ns() - start;
        if (warn > 0 && !warned && waited >= warn) {
            warned = 1;
            fprintf(stderr, "agxguard: a driver call waited %lld ms for the '%s' lock\n",
                    (long long)(waited / 1000000), l->name);
        }
        if (timeout > 0 && waited >= timeout) {
            agx_lock_note_timeout(l);
            end_native_wait(l->name, waited,
                            atomic_load(&agx_wait.timeout_aborts)
                                ? "passed the timeout (AGXGUARD_LOCK_TIMEOUT_MS, action 'abort')"
                                : "passed the timeout (AGXGUARD_LOCK_TIMEOUT_MS; action 'raise' cannot raise "
                                  "from a driver call)",
                            0);
        }
        if (reachable) reachable = native_check_signals(&ts, l, start);
    }
    agx_lock_note_wait(l, agx_now_ns() - start);
    if (ts) PyEval_RestoreThread(ts);
}
