// When a CPU kernel starts an OpenMP team (every ISA build and the kernels compiled once share it).
#pragma once
#include <cstdint>

namespace fm {

// Work (elements × inputs) below which a launch runs on the calling thread alone: starting and joining
// OpenMP's team costs more than such work, and on a loaded machine the join waits for a free core (tiny
// merges measured ~10× slower with two threads than with one on a busy 2-core machine).
constexpr int64_t kParallelWork = int64_t{1} << 18;
inline bool worth_threads(int64_t work) { return work >= kParallelWork; }

// The element loops hand out their chunks dynamically (schedule(dynamic, ~64K elements)) wherever the result
// does not depend on which thread takes a chunk: `fusedmerge merge` writes and prefetches on a third thread,
// and a static share stalls the whole team whenever one of its threads loses its core (measured ~5 % of the
// model_stock end-to-end merge on the 2-core machine).

}  // namespace fm
