// The attention CPU kernels compiled for one capability; see csrc/common/cpu_target.h.
#define FASTATTN_CPU_TARGET 1
#include "../common/cpu_target.h"
#if FASTATTN_BUILD_KERNELS
#include "attention_cpu_kernel.h"
#endif
