// Dense Q4_K matmul on tensor cores for more rows than one mat-vec launch takes.

#include "common.cuh"
#include "mma.cuh"

namespace zq {

// out[t, row] = x[t] · w[row] for `rows` tokens packed in chunks of 8·NB (no `chunks`
// array: chunk blockIdx.y is tokens blockIdx.y·8·NB ..), tensor cores: a block is one 16-row
// tile × S warps splitting K; written in OUT, rounded through ROUND as the mat-vec does.
template <int NB, int S, typename OUT, int ROUND>
__global__ void __launch_bounds__(S * 32)
    matmul_mma_kernel(const uint8_t *__restrict__ w, Packed x, int rows, int n, int k,
                      OUT *__restrict__ out) {
  pdl_enter();
  constexpr int NT = 8 * NB;
  __shared__ float red[S > 1 ? (S - 1) * NB * 4 * 32 : 1];
  const int slice = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int row0 = blockIdx.x * 16, first = blockIdx.y * NT;
  const int nbk = k / QK;
  const size_t row_bytes = (size_t)nbk * QB;
  const size_t base = ((size_t)row0 + gq) * row_bytes;
  float acc[NB][4] = {};
  for (int blk = slice; blk < nbk; blk += S)
    tile_mma<NB>(load_tile(w + base, w + base + 8 * row_bytes, blk, tq), x, k, blockIdx.y, blk,
                 gq, tq, acc);
  reduce_slices<NB, S, 1>(acc, red, 0, slice, lane);
  if (slice == 0)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = first + nb * 8 + 2 * tq + (i & 1), r = row0 + gq + 8 * (i >> 1);
        if (t < rows)
          out[(size_t)t * n + r] = from_float<OUT>(round_via<ROUND>(acc[nb][i]));
      }
}

} // namespace zq

// ---- Dense Q4K matmul on tensor cores for more tokens than one mat-vec launch takes.
// zopilot_q4k_pack_rows packs `rows` quantized rows in chunks of nt (8 or 16): pq
// [ceil(rows / nt) * nt * k] int8, pf [ceil(rows / nt) * nt * k / 64] float4; then
// zopilot_q4k_mma: w [n, k] Q4_K (n % 16 == 0) → out [rows, n] in `dtype` (codes as the
// mat-vec's).
extern "C" int zopilot_q4k_pack_rows(const int8_t *q, const float *d, const float *s, int rows,
                                     int k, int nt, int8_t *pq, void *pf, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid((rows + nt - 1) / nt, k / zq::QK);
  float4 *f = static_cast<float4 *>(pf);
  switch (nt) {
  case 8:
    zq::launch(zq::moe_pack_kernel<1>, grid, 256, 0, st,
        act(q, d, s), nullptr, nullptr, 1, rows, k, pq, f);
    break;
  case 16:
    zq::launch(zq::moe_pack_kernel<2>, grid, 256, 0, st,
        act(q, d, s), nullptr, nullptr, 1, rows, k, pq, f);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

#ifndef ZQ_SMM
#define ZQ_SMM 8
#endif
template <int NB, typename OUT, int ROUND = 0>
static void launch_matmul_mma(dim3 grid, cudaStream_t st, const uint8_t *w, zq::Packed x,
                              int rows, int n, int k, void *out) {
  zq::launch(zq::matmul_mma_kernel<NB, ZQ_SMM, OUT, ROUND>, grid, ZQ_SMM * 32, 0, st,
      w, x, rows, n, k, static_cast<OUT *>(out));
}

template <int NB>
static int matmul_mma_dtype(int dtype, dim3 grid, cudaStream_t st, const uint8_t *w,
                            zq::Packed x, int rows, int n, int k, void *out) {
  switch (dtype) {
  case 0:
    launch_matmul_mma<NB, float>(grid, st, w, x, rows, n, k, out);
    break;
  case 1:
    launch_matmul_mma<NB, __nv_bfloat16>(grid, st, w, x, rows, n, k, out);
    break;
  case 2:
    launch_matmul_mma<NB, half>(grid, st, w, x, rows, n, k, out);
    break;
  case 3:
    launch_matmul_mma<NB, float, 1>(grid, st, w, x, rows, n, k, out);
    break;
  case 4:
    launch_matmul_mma<NB, float, 2>(grid, st, w, x, rows, n, k, out);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

extern "C" int zopilot_q4k_mma(const void *w, int n, int k, int rows, int nt, const int8_t *pq,
                               const void *pf, void *out, int dtype, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(n / 16, (rows + nt - 1) / nt);
  const uint8_t *wb = static_cast<const uint8_t *>(w);
  const zq::Packed x{pq, static_cast<const float4 *>(pf)};
  switch (nt) {
  case 8:
    return matmul_mma_dtype<1>(dtype, grid, st, wb, x, rows, n, k, out);
  case 16:
    return matmul_mma_dtype<2>(dtype, grid, st, wb, x, rows, n, k, out);
  default:
    return (int)cudaErrorInvalidValue;
  }
}
