// Prefill attention's raw scores → probabilities, scaled and with the causal mask added, in
// one launch: candle's affine (the 1/√d scale), broadcast add (a strided kernel that divides
// per element, ~15× its bandwidth time on an H100) and softmax_last_dim were three. The
// arithmetic is theirs, operation for operation, so the result is bit-identical: the scale
// as affine applies it (x · mul + add in T, __hmul then __hadd, mul and add rounded to T on
// the host as candle rounds them), the mask added in T (__hadd), then candle's
// softmax — one warp per row, lanes striding by 32, the row's max in T (__hmax_nan), each
// value's hexp(x − max) in T summed in f32, xor-shuffle reductions in candle's order,
// 1/sum in f64 rounded to f32, each exp scaled by it in T (__hmul). bf16 and f16 only: an
// f32 softmax uses expf, which --use_fast_math would turn into __expf here.

#include "common.cuh"

namespace zq {

constexpr int SMAX_ROWS = 8; // rows (warps) per block

template <typename T> struct HalfOps;
template <> struct HalfOps<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 add(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 sub(__nv_bfloat16 a, __nv_bfloat16 b) { return __hsub(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 mul(__nv_bfloat16 a, __nv_bfloat16 b) { return __hmul(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 max(__nv_bfloat16 a, __nv_bfloat16 b) { return __hmax_nan(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 exp(__nv_bfloat16 a) { return hexp(a); }
  static __device__ __forceinline__ __nv_bfloat16 neg_inf() { return __float2bfloat16(-INFINITY); }
  static __device__ __forceinline__ __nv_bfloat16 bits(unsigned short b) { return __ushort_as_bfloat16(b); }
};
template <> struct HalfOps<half> {
  static __device__ __forceinline__ half add(half a, half b) { return __hadd(a, b); }
  static __device__ __forceinline__ half sub(half a, half b) { return __hsub(a, b); }
  static __device__ __forceinline__ half mul(half a, half b) { return __hmul(a, b); }
  static __device__ __forceinline__ half max(half a, half b) { return __hmax_nan(a, b); }
  static __device__ __forceinline__ half exp(half a) { return hexp(a); }
  static __device__ __forceinline__ half neg_inf() { return __float2half(-INFINITY); }
  static __device__ __forceinline__ half bits(unsigned short b) { return __ushort_as_half(b); }
};

// att [rows, ncols] (rows = batch · heads · q) → out (may alias att), each score first
// taken to att · mul + add (the bits of two T values). Row r's mask row:
// mask + ((r / (heads · q)) · mask_batch_rows + r % q) · ncols, i.e. one [q, ncols] mask
// shared by every head, per batch entry when mask_batch_rows = q, for all when it is 0.
template <typename T>
__global__ void __launch_bounds__(32 * SMAX_ROWS)
    masked_softmax_kernel(const T *att, const T *__restrict__ mask, T *out,
                          long long rows, int ncols, int q, int heads, int mask_batch_rows,
                          unsigned short mul_bits, unsigned short add_bits) {
  pdl_enter();
  using O = HalfOps<T>;
  const T mul = O::bits(mul_bits), add = O::bits(add_bits);
  // The score as candle's affine, then its mask-add, leave it.
  auto score = [&](const T *x, const T *m, int col) {
    return O::add(O::add(O::mul(x[col], mul), add), m[col]);
  };
  const long long row = (long long)blockIdx.x * SMAX_ROWS + threadIdx.y;
  if (row >= rows)
    return;
  const int lane = threadIdx.x;
  const T *x = att + row * ncols;
  const long long mrow = (row / ((long long)heads * q)) * mask_batch_rows + row % q;
  const T *m = mask + mrow * ncols;
  T *y = out + row * ncols;

  T max_val = O::neg_inf();
  for (int col = lane; col < ncols; col += 32)
    max_val = O::max(max_val, score(x, m, col));
#pragma unroll
  for (int s = 16; s > 0; s >>= 1)
    max_val = O::max(max_val, __shfl_xor_sync(0xffffffff, max_val, s, 32));

  float tmp = 0.f;
  for (int col = lane; col < ncols; col += 32)
    tmp += to_float(O::exp(O::sub(score(x, m, col), max_val)));
#pragma unroll
  for (int s = 16; s > 0; s >>= 1)
    tmp += __shfl_xor_sync(0xffffffff, tmp, s, 32);
  const T inv = from_float<T>((float)(1.0 / (double)tmp));

  // Every read of x above precedes this lane's writes to the same columns (out may be att).
  for (int col = lane; col < ncols; col += 32)
    y[col] = O::mul(O::exp(O::sub(score(x, m, col), max_val)), inv);
}

} // namespace zq

// att, out: [rows, ncols] contiguous in `dtype` (1 bf16, 2 f16), out may be att; mul_bits,
// add_bits: the scale's affine factors as bits of that dtype; mask
// contiguous in the same dtype, [q, ncols] (mask_batch_rows 0: shared by every batch entry
// and head) or [batch, q, ncols] (mask_batch_rows = q). rows = batch · heads · q.
extern "C" int zopilot_masked_softmax(const void *att, const void *mask, void *out,
                                      long long rows, int ncols, int q, int heads,
                                      int mask_batch_rows, unsigned short mul_bits,
                                      unsigned short add_bits, int dtype, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (rows <= 0 || ncols <= 0 || q <= 0 || heads <= 0)
    return (int)cudaErrorInvalidValue;
  const dim3 grid((unsigned)((rows + zq::SMAX_ROWS - 1) / zq::SMAX_ROWS)), block(32, zq::SMAX_ROWS);
  switch (dtype) {
  case 1:
    zq::launch(zq::masked_softmax_kernel<__nv_bfloat16>, grid, block, 0, st,
        static_cast<const __nv_bfloat16 *>(att), static_cast<const __nv_bfloat16 *>(mask),
        static_cast<__nv_bfloat16 *>(out), rows, ncols, q, heads, mask_batch_rows, mul_bits,
        add_bits);
    break;
  case 2:
    zq::launch(zq::masked_softmax_kernel<half>, grid, block, 0, st, static_cast<const half *>(att),
        static_cast<const half *>(mask), static_cast<half *>(out), rows, ncols, q, heads,
        mask_batch_rows, mul_bits, add_bits);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
