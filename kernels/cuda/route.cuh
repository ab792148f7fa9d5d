// Router logits and top-k routing of one token, shared by the router kernel (matvec.cu) and
// the RMSNorm kernel that can route the row it normalizes (norm.cu).
#pragma once

#include "common.cuh"

namespace zq {

// Router logits of one token (one warp per expert, rounded through ROUND as the model's dtype
// would) and its top-k routing: the k largest logits (lowest index on ties) and their
// softmax, as mistral.rs' topk_softmax computes it. experts ≤ 256, topk ≤ 8. Every thread of
// the block calls it (it synchronizes the block); NC false where the same kernel wrote x.
template <int ROUND, bool NC>
__device__ __forceinline__ void route_token(const uint8_t *__restrict__ w, int experts, int k,
                                            const ActRow &x, int topk, int token,
                                            uint32_t *__restrict__ ids,
                                            float *__restrict__ weights) {
  __shared__ float logits[256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
  const int nb = k / QK;
  const size_t row_bytes = (size_t)nb * QB;
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  for (int e = warp; e < experts; e += warps) {
    float acc = 0.0f;
    for (int blk = lane >> 3; blk < nb; blk += 4)
      acc += lane_dot(load_w(w + e * row_bytes, blk, g, h), load_act<NC>(x, blk, g, h), g);
    acc = warp_sum(acc);
    if (lane == 0)
      logits[e] = round_via<ROUND>(acc);
  }
  __syncthreads();
  if (threadIdx.x != 0)
    return;
  float val[8];
  int idx[8];
  for (int j = 0; j < topk; ++j) {
    int best = 0;
    for (int e = 1; e < experts; ++e)
      if (logits[e] > logits[best])
        best = e;
    val[j] = logits[best];
    idx[j] = best;
    logits[best] = -INFINITY;
  }
  float sum = 0.0f;
  for (int j = 0; j < topk; ++j) {
    val[j] = expf(val[j] - val[0]);
    sum += val[j];
  }
  const float inv = 1.0f / sum;
  for (int j = 0; j < topk; ++j) {
    ids[token * topk + j] = (uint32_t)idx[j];
    weights[token * topk + j] = val[j] * inv;
  }
}

} // namespace zq
