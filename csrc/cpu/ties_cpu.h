// TIES on the CPU: selection of the trim thresholds and the fused merge (csrc/cpu/ties_cpu.cpp).
#pragma once
#include <cstdint>

#include "../common/table.h"

namespace fm {

struct TiesParams {
  bool model_scope;     // one threshold per model over all rows, else one per (row, model)
  bool elect_count;     // elect by the count of signs, else by the summed mass
  bool weighted_vote;   // vote on w_i * τ̂_i, else on τ̂_i
  MergeMode merge;      // csrc/common/table.h
  double scaling;       // λ
  double drop_rescale;  // DARE-TIES: kept deltas × this (rows with a drop threshold)
};

#define FM_DECLARE_CPU_TIES(ns)                                                                                    \
  namespace ns {                                                                                                   \
  void ties_select(const int64_t* table, int64_t n_tensors, int64_t n_inputs, bool model_scope, const int64_t* ks, \
                   uint32_t* thresholds);                                                                          \
  int64_t ties_sign_sum(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,            \
                        const uint32_t* thresholds);                                                               \
  void ties_merge(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,                  \
                  const uint32_t* thresholds, float tie_sign);                                                     \
  }
FM_DECLARE_CPU_TIES(baseline)
FM_DECLARE_CPU_TIES(avx2)
FM_DECLARE_CPU_TIES(avx512)
#undef FM_DECLARE_CPU_TIES

// The best variant for this CPU (csrc/cpu/dispatch.cpp).
void cpu_ties_select(const int64_t* table, int64_t n_tensors, int64_t n_inputs, bool model_scope, const int64_t* ks,
                     uint32_t* thresholds);
int64_t cpu_ties_sign_sum(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                          const uint32_t* thresholds);
void cpu_ties_merge(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                    const uint32_t* thresholds, float tie_sign);

}  // namespace fm
