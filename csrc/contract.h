// The option codes and limits of the infigw kernels: the only C++ copy, shared by the CPU and CUDA code. The
// Python copy is infigw/contract.py; tests/test_contract.py parses this file and keeps the two equal. Torch-free,
// so the CUDA kernel headers include it under a bare `nvcc -c`. The schemas (csrc/ops.cpp) take the options as
// strings; csrc/op_checks.h maps them to these codes once per call.
#pragma once

#include <cstring>

namespace infigw {

// values: how a kept logit becomes its node value a_p (docs/math.md §2). Indexed by the code.
enum ValuesMode : int { kValuesLogits = 0, kValuesProbs = 1, kValuesTopkProbs = 2 };
inline constexpr const char* kValuesNames[] = {"logits", "probs", "topk_probs"};

// nodes: what a node of the co-activation graph is (docs/math.md §2): a vocabulary id or a rank slot.
enum NodesMode : int { kNodesVocab = 0, kNodesRank = 1 };
inline constexpr const char* kNodesNames[] = {"vocab", "rank"};

// graph_norm: how the graph of a sequence is normalised (docs/math.md §3).
enum GraphNorm : int { kNormMean = 0, kNormSum = 1, kNormCosine = 2 };
inline constexpr const char* kGraphNormNames[] = {"mean", "sum", "cosine"};

// The largest k of the CUDA kernels: a row's kept set lives in one block (one slot per thread) or in one warp's
// registers (kCudaMaxK / 32 slots per lane).
inline constexpr int kCudaMaxK = 256;

// The code of `name` in `names`, or -1 when it is none of them.
template <int N>
inline int code_of(const char* const (&names)[N], const char* name) {
  for (int i = 0; i < N; ++i)
    if (std::strcmp(names[i], name) == 0) return i;
  return -1;
}

}  // namespace infigw
