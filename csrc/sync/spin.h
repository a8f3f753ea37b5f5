/* spin.h: spinning waits, and how many threads may spin at once.
 *
 * Spinning slots: a thread may spin only while it holds one, and there are the
 * thread's usable CPUs less two (so spinners never starve the threads they wait
 * for: the one running a batch, the one holding the GIL; none on a machine of
 * two CPUs). Usable CPUs: the thread's affinity mask (Linux), capped by a
 * cgroup CPU quota (read once). */
#ifndef AGX_SPIN_H
#define AGX_SPIN_H

#include <stdint.h>

/* CPUs the calling thread may use. Kept per thread; call agx_affinity_changed()
 * after changing a thread's affinity (other changes are seen within 100 ms). */
int agx_usable_cpus(void);
void agx_affinity_changed(void);
int agx_spin_enter(void); /* 1: the caller holds a slot now */
void agx_spin_leave(void);
/* Spin (pausing) until ready(arg) returns nonzero (then 1) or spin_ns passes
 * (then 0). agx_spin_slotted does the same inside a spinning slot, and returns 0
 * at once when spin_ns <= 0 or no slot is free. */
int agx_spin_until(int (*ready)(void *), void *arg, int64_t spin_ns);
int agx_spin_slotted(int (*ready)(void *), void *arg, int64_t spin_ns);

#endif
