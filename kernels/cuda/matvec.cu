// Q4_K mat-vec for up to 8 tokens and up to three weights per launch (q, k, v), and the
// router: logits of every expert and the token's top-k in one launch.

#include "common.cuh"
#include "route.cuh"

namespace zq {

// route_token for token blockIdx.x of x_all.
template <int ROUND>
__global__ void __launch_bounds__(WARPS * 32)
    router_topk_kernel(const uint8_t *__restrict__ w, int experts, int k, Act x_all,
                       int topk, uint32_t *__restrict__ ids,
                       float *__restrict__ weights) {
  pdl_enter();
  const int token = blockIdx.x;
  route_token<ROUND, true>(w, experts, k, act_row(x_all, token, k), topk, token, ids, weights);
}

// Up to three weight matrices with the same row length, one launch: their rows numbered
// one after another, a warp per row; `rows_end` is cumulative.
struct MvJobs {
  const uint8_t *w[3];
  void *out[3];
  int rows_end[3];
  int count;
};

// y[t, row] = x[t] · w[row] for NT tokens, one row per warp, each weight byte read once.
// One token: four blocks an SM (64 registers; ptxas' own choice, 77, fits three). Kernel
// bench on an H100: the lm_head 38.7 against 40.8–41.0 µs, q 7.5–7.8 against
// 7.6–8.1, the 58-kernel chain 991 against 1,002 µs; five blocks spill (lm_head 67 µs).
template <int NT, typename OUT, int ROUND>
__global__ void __launch_bounds__(WARPS * 32, NT == 1 ? 4 : 1)
    matvec_kernel(const MvJobs jobs, int k, Act x_all) {
  pdl_enter();
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  int row = blockIdx.x * WARPS + warp;
  int j = 0;
  while (j < jobs.count && row >= jobs.rows_end[j])
    ++j;
  if (j == jobs.count)
    return;
  const int start = j ? jobs.rows_end[j - 1] : 0;
  const int n = jobs.rows_end[j] - start;
  row -= start;
  OUT *out = static_cast<OUT *>(jobs.out[j]);
  const int nb = k / QK;
  const uint8_t *wr = jobs.w[j] + (size_t)row * nb * QB;
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t)
    acc[t] = 0.0f;
  constexpr int U = NT <= 2 ? 4 : (NT <= 4 ? 2 : 1);
  for (int base = lane >> 3; base < nb; base += 4 * U) {
    LaneW wv[U];
    load_steps<U>(wr, base, nb, g, h, wv);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + 4 * u < nb) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
          acc[t] += lane_dot(wv[u], load_act(act_row(x_all, t, k), base + 4 * u, g, h), g);
      }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float s = warp_sum(acc[t]);
    if (lane == 0)
      out[(size_t)t * n + row] = from_float<OUT>(round_via<ROUND>(s));
  }
}

template <typename OUT, int ROUND = 0>
void launch_matvec(int tokens, dim3 grid, dim3 block, cudaStream_t st,
                   const MvJobs &jobs, int k, const Act &x) {
  switch (tokens) {
#define ZQ_MV(NT)                                                              \
  case NT:                                                                     \
    zq::launch(zq::matvec_kernel<NT, OUT, ROUND>, grid, block, 0, st, jobs, k, x);         \
    break;
    ZQ_MV(1) ZQ_MV(2) ZQ_MV(3) ZQ_MV(4) ZQ_MV(5) ZQ_MV(6) ZQ_MV(7) ZQ_MV(8)
#undef ZQ_MV
  default:
    break;
  }
}

} // namespace zq

// Router + top-k for `tokens` quantized rows: w [experts, k] Q4_K (experts ≤ 256);
// ids [tokens, topk] u32, weights [tokens, topk] f32 (topk ≤ 8). round: 0 none, 1 bf16, 2 f16.
extern "C" int zopilot_router_topk(const void *w, int experts, int k,
                                   const int8_t *xq, const float *xd,
                                   const float *xs, int tokens, int topk,
                                   int round, uint32_t *ids, float *weights,
                                   long long stream) {
  if (experts < 1 || experts > 256 || topk < 1 || topk > 8 || topk > experts)
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const uint8_t *wb = static_cast<const uint8_t *>(w);
  const dim3 grid(tokens), block(zq::WARPS * 32);
  const zq::Act x = act(xq, xd, xs);
  switch (round) {
  case 0:
    zq::launch(zq::router_topk_kernel<0>, grid, block, 0, st,
        wb, experts, k, x, topk, ids, weights);
    break;
  case 1:
    zq::launch(zq::router_topk_kernel<1>, grid, block, 0, st,
        wb, experts, k, x, topk, ids, weights);
    break;
  case 2:
    zq::launch(zq::router_topk_kernel<2>, grid, block, 0, st,
        wb, experts, k, x, topk, ids, weights);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// `count` (1..3) weights w[i]: [n[i], k] Q4_K, one launch; x: [tokens, k] quantized
// (tokens 1..8); out[i]: [tokens, n[i]] in `dtype`. Callers with more tokens offset the
// activation rows and the outputs per launch of 8.
extern "C" int zopilot_q4k_matvec(const void *const *w, const int *n,
                                  void *const *out, int count, int k,
                                  const int8_t *xq, const float *xd,
                                  const float *xs, int tokens, int dtype,
                                  long long stream) {
  if (tokens < 1 || tokens > zq::MAX_TOKENS || count < 1 || count > 3)
    return (int)cudaErrorInvalidValue;
  zq::MvJobs jobs{};
  int rows = 0;
  for (int i = 0; i < count; ++i) {
    jobs.w[i] = static_cast<const uint8_t *>(w[i]);
    jobs.out[i] = out[i];
    rows += n[i];
    jobs.rows_end[i] = rows;
  }
  jobs.count = count;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid((rows + zq::WARPS - 1) / zq::WARPS), block(zq::WARPS * 32);
  const zq::Act x = act(xq, xd, xs);
  switch (dtype) {
  case 0:
    zq::launch_matvec<float>(tokens, grid, block, st, jobs, k, x);
    break;
  case 1:
    zq::launch_matvec<__nv_bfloat16>(tokens, grid, block, st, jobs, k, x);
    break;
  case 2:
    zq::launch_matvec<half>(tokens, grid, block, st, jobs, k, x);
    break;
  case 3:
    zq::launch_matvec<float, 1>(tokens, grid, block, st, jobs, k, x);
    break;
  case 4:
    zq::launch_matvec<float, 2>(tokens, grid, block, st, jobs, k, x);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
