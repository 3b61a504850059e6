// Runtime choice of the CPU kernel variant: the wheel carries baseline x86-64, x86-64-v3 (AVX2, FMA
// unused) and x86-64-v4 (AVX-512) builds of the same sources and runs the best one this CPU supports.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "combine_cpu.h"
#include "dots_cpu.h"
#include "ties_cpu.h"

namespace fm {
namespace {

struct Variant {
  const char* name;
  decltype(&baseline::combine) combine;
  decltype(&baseline::l1_buckets) l1_buckets;
  decltype(&baseline::ties_select) ties_select;
  decltype(&baseline::ties_sign_sum) ties_sign_sum;
  decltype(&baseline::ties_merge) ties_merge;
  decltype(&baseline::dots) dots;
};

#define FM_VARIANT(ns) {#ns, ns::combine, ns::l1_buckets, ns::ties_select, ns::ties_sign_sum, ns::ties_merge, ns::dots}

// The best variant this CPU runs, or the one FUSEDMERGE_CPU_ISA names (baseline, avx2, avx512: tests run each).
Variant select_variant() {
  const char* asked = std::getenv("FUSEDMERGE_CPU_ISA");
  const std::string want = asked == nullptr ? "" : asked;
  if (want == "baseline") return FM_VARIANT(baseline);
#if defined(FM_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (want == "avx512" && avx512) return FM_VARIANT(avx512);
  if (want == "avx2" && avx2) return FM_VARIANT(avx2);
  if (want.empty() && avx512) return FM_VARIANT(avx512);
  if (want.empty() && avx2) return FM_VARIANT(avx2);
#endif
  if (!want.empty())
    throw std::invalid_argument("FUSEDMERGE_CPU_ISA=" + want + ": this CPU or build has no such kernel variant " +
                                "(baseline, avx2, avx512)");
  return FM_VARIANT(baseline);
}

const Variant& variant() {
  static const Variant v = select_variant();
  return v;
}

}  // namespace

const char* cpu_isa() { return variant().name; }

void cpu_combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs) {
  variant().combine(table, n_tensors, n_inputs);
}

void cpu_l1_buckets(const int64_t* table, int64_t n_tensors, int64_t n_inputs, int64_t* buckets) {
  variant().l1_buckets(table, n_tensors, n_inputs, buckets);
}

void cpu_ties_select(const int64_t* table, int64_t n_tensors, int64_t n_inputs, bool model_scope, const int64_t* ks,
                     uint32_t* thresholds) {
  variant().ties_select(table, n_tensors, n_inputs, model_scope, ks, thresholds);
}

int64_t cpu_ties_sign_sum(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                          const uint32_t* thresholds) {
  return variant().ties_sign_sum(table, n_tensors, n_inputs, p, thresholds);
}

void cpu_ties_merge(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                    const uint32_t* thresholds, float tie_sign) {
  variant().ties_merge(table, n_tensors, n_inputs, p, thresholds, tie_sign);
}

void cpu_dots(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const DotsParams& p) {
  variant().dots(table, n_tensors, n_inputs, p);
}

}  // namespace fm
