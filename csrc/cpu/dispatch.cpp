// Runtime choice of the CPU kernel variant: the wheel carries baseline x86-64, x86-64-v3 (AVX2, FMA
// unused) and x86-64-v4 (AVX-512) builds of the same source and runs the best one this CPU supports.
#include "combine_cpu.h"

namespace fm {
namespace {

using CombineFn = void (*)(const int64_t*, int64_t, int64_t, const double*);

struct Variant {
  const char* name;
  CombineFn combine;
};

Variant select_variant() {
#if defined(FM_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return {"avx512", avx512::combine};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    return {"avx2", avx2::combine};
#endif
  return {"baseline", baseline::combine};
}

const Variant& variant() {
  static const Variant v = select_variant();
  return v;
}

}  // namespace

const char* cpu_isa() { return variant().name; }

void cpu_combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const double* coeffs) {
  variant().combine(table, n_tensors, n_inputs, coeffs);
}

}  // namespace fm
