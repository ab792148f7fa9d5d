// RMSNorm fused with the quantization of its output, the residual add before it and,
// optionally, the MoE routing of the normalized row.

#include "common.cuh"
#include "route.cuh"

namespace zq {

// RMSNorm (candle's arithmetic: f32 sum of squares, scale * x * alpha rounded to T) of
// `x`, or of h = x + resid (rounded to T, written to `h_out`), quantized for the
// mat-vec. One 1024-thread block per row; k % 32 == 0, so each warp's 32 values of an
// iteration are one quantization group. With `router` (Q4_K [experts, k]), the row's MoE
// routing too, from the quantized row, as router_topk_kernel would compute it (its weight
// rows prefetched into L2 while the norm runs): the router's launch saved.
template <typename T>
__global__ void __launch_bounds__(1024)
    rmsnorm_quantize_kernel(const T *__restrict__ x, const T *__restrict__ resid,
                            T *__restrict__ h_out, const T *__restrict__ alpha,
                            int k, float eps, Act out, const uint8_t *__restrict__ router,
                            int experts, int topk, uint32_t *__restrict__ ids,
                            float *__restrict__ weights) {
  pdl_enter();
  if (router != nullptr) {
    const size_t lines = (size_t)experts * (k / QK) * QB / 128;
    for (size_t i = threadIdx.x; i < lines; i += blockDim.x)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(router + i * 128));
  }
  __shared__ float partial[32];
  const size_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  const T *xr = x + row * k;
  float ss = 0.0f;
  for (int col = tid; col < k; col += 1024) {
    float v = to_float(xr[col]);
    if (resid) {
      const T h = from_float<T>(v + to_float(resid[row * k + col]));
      h_out[row * k + col] = h;
      v = to_float(h);
    }
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0)
    partial[warp] = ss;
  __syncthreads();
  ss = warp_sum(lane < (int)(blockDim.x / 32) ? partial[lane] : 0.0f);
  const float scale = rsqrtf(ss / k + eps);
  for (int col = tid; col < k; col += 1024) {
    const float v = resid ? to_float(h_out[row * k + col]) : to_float(xr[col]);
    const float y = to_float(from_float<T>(scale * v * to_float(alpha[col])));
    quantize_group(y, lane, out, row * k + (col - lane));
  }
  if (router != nullptr) {
    __syncthreads(); // the quantized row, written by every warp, read by the router's
    route_token<round_code<T>(), false>(router, experts, k, act_row(out, row, k), topk, (int)row,
                                        ids, weights);
  }
}

} // namespace zq

// x, resid (nullable), h_out (written when resid is given): [rows, k]; alpha: [k]; all in
// `dtype` (0 f32, 1 bf16, 2 f16). The normalized rows quantized into q, d, s. k % 32 == 0.
extern "C" int zopilot_rmsnorm_quantize(const void *x, const void *resid,
                                        void *h_out, const void *alpha,
                                        int rows, int k, float eps, int dtype,
                                        int8_t *q, float *d, float *s,
                                        const void *router, int experts, int topk,
                                        uint32_t *ids, float *weights,
                                        long long stream) {
  if (router != nullptr && (experts < 1 || experts > 256 || topk < 1 || topk > 8 ||
                            topk > experts || k % zq::QK || !ids || !weights))
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(rows), block(1024);
  const zq::Act out = act(q, d, s);
  switch (dtype) {
#define ZQ_RMS(CODE, T)                                                        \
  case CODE:                                                                   \
    zq::launch(zq::rmsnorm_quantize_kernel<T>, grid, block, 0, st,                     \
        static_cast<const T *>(x), static_cast<const T *>(resid),              \
        static_cast<T *>(h_out), static_cast<const T *>(alpha), k, eps, out,   \
        static_cast<const uint8_t *>(router), experts, topk, ids, weights);    \
    break;
    ZQ_RMS(0, float)
    ZQ_RMS(1, __nv_bfloat16)
    ZQ_RMS(2, half)
#undef ZQ_RMS
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
