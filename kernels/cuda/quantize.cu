// Activation rows (f32, bf16 or f16) → the int8 layout every Q4_K kernel reads.

#include "common.cuh"

namespace zq {

// x [rows, K] (row stride in elements) → Act rows. One warp per group.
template <typename T>
__global__ void quantize_kernel(const T *__restrict__ x, long long stride,
                                int rows, int k, Act out) {
  pdl_enter();
  const int groups = k / Q8;
  const long long gw = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (gw >= (long long)rows * groups)
    return;
  const int r = (int)(gw / groups), g = (int)(gw % groups);
  const float v = to_float(x[r * stride + g * Q8 + lane]);
  quantize_group(v, lane, out, (size_t)r * k + g * Q8);
}

} // namespace zq

extern "C" int zopilot_q8_quantize(const void *x, int dtype, long long stride,
                                   int rows, int k, int8_t *q, float *d, float *s,
                                   long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = (long long)rows * (k / zq::Q8) * 32;
  const dim3 block(256), grid((unsigned)((threads + 255) / 256));
  const zq::Act out = act(q, d, s);
  switch (dtype) {
  case 0:
    zq::launch(zq::quantize_kernel<float>, grid, block, 0, st,
        static_cast<const float *>(x), stride, rows, k, out);
    break;
  case 1:
    zq::launch(zq::quantize_kernel<__nv_bfloat16>, grid, block, 0, st,
        static_cast<const __nv_bfloat16 *>(x), stride, rows, k, out);
    break;
  case 2:
    zq::launch(zq::quantize_kernel<half>, grid, block, 0, st,
        static_cast<const half *>(x), stride, rows, k, out);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
