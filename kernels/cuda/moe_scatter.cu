// The host-routed grouped MoE path's combine (prefill and batches past the tensor-core
// kernels): one expert's rows, scaled by their routing weights, added into the f32 output at
// their tokens' rows. candle's index_add took 4 blocks for a 4,096-wide row and looped over
// the tokens in each (347 µs an expert at a 4,096-token prompt on an H100) and copied the
// whole output first; here every element is a thread and the output is updated in place.
// Bit-identical to `ys.index_add(idx, src.broadcast_mul(scale))`: the product rounded to f32,
// then the sum (__fmul_rn / __fadd_rn: no contraction into an FMA), and a token appears at
// most once per expert, so no two threads of a launch touch one element.

#include "common.cuh"

namespace zq {

__global__ void moe_scatter_add_kernel(float *__restrict__ dst, const uint32_t *__restrict__ idx,
                                       const float *__restrict__ src,
                                       const float *__restrict__ scale, long long m, int hidden) {
  pdl_enter();
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= m * hidden)
    return;
  const long long r = i / hidden;
  const int c = (int)(i - r * hidden);
  float *d = dst + (long long)idx[r] * hidden + c;
  *d = __fadd_rn(*d, __fmul_rn(src[i], scale[r]));
}

} // namespace zq

// dst [n, hidden] f32 (updated in place); idx [m] u32 rows of dst, no repeats; src [m, hidden]
// f32; scale [m] f32.
extern "C" int zopilot_moe_scatter_add(float *dst, const uint32_t *idx, const float *src,
                                       const float *scale, long long m, int hidden,
                                       long long stream) {
  if (m <= 0 || hidden <= 0)
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long total = m * hidden;
  zq::launch(zq::moe_scatter_add_kernel, (unsigned)((total + 255) / 256), 256, 0, st, dst, idx, src,
             scale, m, hidden);
  return (int)cudaGetLastError();
}
