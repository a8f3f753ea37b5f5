/* module_state.h: objects of agxguard._C shared between its C files. */
#ifndef AGX_MODULE_STATE_H
#define AGX_MODULE_STATE_H

#include <Python.h>

extern PyObject *agx_LockTimeout;     /* agxguard.LockTimeout (TimeoutError) */
extern PyObject *agx_LockWaitWarning; /* agxguard.LockWaitWarning (RuntimeWarning) */

#endif
