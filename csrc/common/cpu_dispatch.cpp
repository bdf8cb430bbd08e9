#include "cpu_dispatch.h"

#include <ATen/Version.h>

#include <string>

namespace fastattn::cpu {

Capability capability() {
  static const Capability cap = [] {
#if FASTATTN_X86_TARGETS
    const std::string torch_cap = at::get_cpu_capability();
    if (torch_cap == "AVX512") return Capability::kAvx512;
    if (torch_cap == "AVX2") return Capability::kAvx2;
#endif
    return Capability::kDefault;
  }();
  return cap;
}

}  // namespace fastattn::cpu
