// Mixtral's experts for one or two tokens, one kernel pass per (token, expert) pair:
// w1‖w3 with SiLU·mul and the activation's quantization, then w2 with the
// routing-weighted sum and the residual.

#include "common.cuh"

namespace zq {

// The w13 kernel's arithmetic: activation sums by dp4a in the lane (its eight weight rows
// share one activation load, so the sums cost no extra load there) and ggml's branchy scale
// decode. Measured on an H100 against the precomputed sums and branch-free decode above in
// that kernel (same run): one stream ITL 1.70 against 1.78 ms. w2 and the mat-vec,
// one weight row per activation load, are faster with the precomputed sums.
__device__ __forceinline__ uint32_t scale_byte(const uint4 &hd, int i) {
  const uint32_t w = i < 4 ? hd.y : (i < 8 ? hd.z : hd.w);
  return (w >> (8 * (i & 3))) & 0xFF;
}
__device__ __forceinline__ void scale_min_ggml(const uint4 &hd, int j, float &sc, float &m) {
  if (j < 4) {
    sc = (float)(scale_byte(hd, j) & 63);
    m = (float)(scale_byte(hd, j + 4) & 63);
  } else {
    sc = (float)((scale_byte(hd, j + 4) & 0xF) | ((scale_byte(hd, j - 4) >> 6) << 4));
    m = (float)((scale_byte(hd, j + 4) >> 4) | ((scale_byte(hd, j) >> 6) << 4));
  }
}
struct LaneActSums {
  int4 lo, hi;
  float dlo, dhi;
  int slo, shi;
};
__device__ __forceinline__ LaneActSums load_act_sums(const ActRow &x, int blk, int g, int h) {
  const int v0 = blk * QK + 64 * g + 16 * h;
  LaneActSums a;
  a.lo = __ldg(reinterpret_cast<const int4 *>(x.q + v0));
  a.hi = __ldg(reinterpret_cast<const int4 *>(x.q + v0 + 32));
  a.dlo = __ldg(x.d + v0 / Q8);
  a.dhi = __ldg(x.d + v0 / Q8 + 1);
  const int4 ones = make_int4(0x01010101, 0x01010101, 0x01010101, 0x01010101);
  a.slo = dp4(ones, a.lo);
  a.shi = dp4(ones, a.hi);
  return a;
}
__device__ __forceinline__ float lane_dot_sums(const LaneW &w, const LaneActSums &a, int g) {
  float sc0, m0, sc1, m1;
  scale_min_ggml(w.hd, 2 * g, sc0, m0);
  scale_min_ggml(w.hd, 2 * g + 1, sc1, m1);
  const int4 lo = make_int4(w.q.x & 0x0F0F0F0F, w.q.y & 0x0F0F0F0F,
                            w.q.z & 0x0F0F0F0F, w.q.w & 0x0F0F0F0F);
  const int4 hi =
      make_int4((w.q.x >> 4) & 0x0F0F0F0F, (w.q.y >> 4) & 0x0F0F0F0F,
                (w.q.z >> 4) & 0x0F0F0F0F, (w.q.w >> 4) & 0x0F0F0F0F);
  const float2 dm = __half22float2(*reinterpret_cast<const half2 *>(&w.hd.x));
  const float plo = dm.x * sc0 * (float)dp4(lo, a.lo) - dm.y * m0 * (float)a.slo;
  const float phi = dm.x * sc1 * (float)dp4(hi, a.hi) - dm.y * m1 * (float)a.shi;
  return a.dlo * plo + a.dhi * phi;
}

// Experts' w1 and w3 for (token, slot) pair blockIdx.y, rows blockIdx.x*32 .. +32 (4 per
// warp, 8 warps): act = silu(x·w1) * (x·w3), written quantized (the block's 32 rows are one
// quantization group). Four rows of each matrix per warp keep 8 row streams in flight per
// lane; two rows per warp with twice the warps was 35 % slower on an H100 (ncu).
#ifndef ZQ_W13_MIN_BLOCKS // blocks per SM asked of the compiler (kernel bench experiments)
#define ZQ_W13_MIN_BLOCKS 1
#endif
// w2: three blocks an SM (at most 85 registers; left alone, ptxas took 128 and two fit).
// Kernel bench on an H100: 30.4–30.8 against 31.7 µs at one token, 52.8
// against 57.5 at two.
#ifndef ZQ_W2_MIN_BLOCKS
#define ZQ_W2_MIN_BLOCKS 3
#endif
__global__ void __launch_bounds__(WARPS * 32, ZQ_W13_MIN_BLOCKS)
    moe_w13_silu_kernel(const uint8_t *__restrict__ w1,
                        const uint8_t *__restrict__ w3,
                        const uint32_t *__restrict__ ids, int topk, Act x_all,
                        int n, int k, Act act_out) {
  pdl_enter();
  __shared__ float gate_s[32], up_s[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int pair = blockIdx.y, token = pair / topk;
  const size_t e = ids[pair];
  const int nb = k / QK;
  const size_t row_bytes = (size_t)nb * QB;
  const ActRow x = act_row(x_all, token, k);
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  const int row0 = blockIdx.x * 32 + warp * 4;
  const uint8_t *r1 = w1 + (e * n + row0) * row_bytes;
  const uint8_t *r3 = w3 + (e * n + row0) * row_bytes;
  float gate[4] = {0, 0, 0, 0}, up[4] = {0, 0, 0, 0};
  for (int blk = lane >> 3; blk < nb; blk += 4) {
    const LaneActSums a = load_act_sums(x, blk, g, h);
    LaneW wg[4], wu[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      wg[r] = load_w(r1 + r * row_bytes, blk, g, h);
      wu[r] = load_w(r3 + r * row_bytes, blk, g, h);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      gate[r] += lane_dot_sums(wg[r], a, g);
      up[r] += lane_dot_sums(wu[r], a, g);
    }
  }
  // The block's 32 sums meet in shared memory; warp 0 applies SiLU·mul, a row per lane (one
  // lane per warp doing four was ~2 µs slower in the kernel bench), and quantizes them.
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float gs = warp_sum(gate[r]), us = warp_sum(up[r]);
    if (lane == 0) {
      gate_s[warp * 4 + r] = gs;
      up_s[warp * 4 + r] = us;
    }
  }
  __syncthreads();
  if (warp == 0) {
    const float gs = gate_s[lane];
    quantize_group(gs / (1.0f + __expf(-gs)) * up_s[lane], lane, act_out,
                   (size_t)pair * n + blockIdx.x * 32);
  }
}

// One warp per (output row, slot): the row's dot product with the slot's activation, then the
// block adds its rows' slots (in slot order, routing-weighted) through shared memory, plus
// `resid` when given. A block is WARPS / topk rows × topk slots (topk ≤ WARPS).
template <typename OUT>
__global__ void __launch_bounds__(WARPS * 32, ZQ_W2_MIN_BLOCKS)
    moe_w2_kernel(const uint8_t *__restrict__ w2, const uint32_t *__restrict__ ids,
                  const float *__restrict__ topw, int topk, Act act, int n, int k,
                  const OUT *__restrict__ resid, OUT *__restrict__ out) {
  pdl_enter();
  __shared__ float part[WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int token = blockIdx.y, rows_per_block = WARPS / topk;
  const int r = warp / topk, slot = warp % topk;
  const int row = blockIdx.x * rows_per_block + r;
  float acc = 0.0f;
  if (r < rows_per_block && row < n) {
    const int nb = k / QK;
    const size_t row_bytes = (size_t)nb * QB;
    const int sub = lane & 7, g = sub >> 1, h = sub & 1;
    const int pair = token * topk + slot;
    const uint8_t *wr = w2 + ((size_t)ids[pair] * n + row) * row_bytes;
    const ActRow x = act_row(act, pair, k);
    constexpr int U = 4;
    for (int base = lane >> 3; base < nb; base += 4 * U) {
      LaneW w[U];
      load_steps<U>(wr, base, nb, g, h, w);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + 4 * u < nb)
          acc += lane_dot(w[u], load_act(x, base + 4 * u, g, h), g);
    }
    acc = topw[pair] * warp_sum(acc);
  }
  if (lane == 0)
    part[warp] = acc;
  __syncthreads();
  if (warp == 0 && lane < rows_per_block) {
    const int orow = blockIdx.x * rows_per_block + lane;
    if (orow < n) {
      float total = 0.0f;
      for (int s = 0; s < topk; ++s)
        total += part[lane * topk + s];
      store_moe_out(out, resid, (size_t)token * n + orow, total);
    }
  }
}

} // namespace zq

// w1, w3: [E, n, k] Q4_K; ids: [pairs] (token-major, `topk` per token); x: [tokens, k]
// quantized; act out: [pairs, n] quantized. n % 32 == 0, k % 256 == 0.
extern "C" int zopilot_moe_w13_silu(const void *w1, const void *w3,
                                    const uint32_t *ids, int pairs, int topk,
                                    const int8_t *xq, const float *xd,
                                    const float *xs, int n, int k, int8_t *aq,
                                    float *ad, float *as, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(n / 32, pairs), block(zq::WARPS * 32);
  zq::launch(zq::moe_w13_silu_kernel, grid, block, 0, st,
      static_cast<const uint8_t *>(w1), static_cast<const uint8_t *>(w3), ids,
      topk, act(xq, xd, xs), n, k, act(aq, ad, as));
  return (int)cudaGetLastError();
}

// w2: [E, n, k] Q4_K; act: [tokens * topk, k] quantized; resid (nullable) and out:
// [tokens, n] in `dtype`. topk ≤ 8.
extern "C" int zopilot_moe_w2(const void *w2, const uint32_t *ids,
                              const float *topw, int tokens, int topk,
                              const int8_t *aq, const float *ad, const float *as,
                              int n, int k, const void *resid, void *out,
                              int dtype, long long stream) {
  if (topk < 1 || topk > zq::WARPS)
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 block(zq::WARPS * 32);
  const uint8_t *w = static_cast<const uint8_t *>(w2);
  const int rows_per_block = zq::WARPS / topk;
  const dim3 grid((n + rows_per_block - 1) / rows_per_block, tokens);
  const zq::Act a = act(aq, ad, as);
  switch (dtype) {
#define ZQ_W2(CODE, T)                                                         \
  case CODE:                                                                   \
    zq::launch(zq::moe_w2_kernel<T>, grid, block, 0, st,                               \
        w, ids, topw, topk, a, n, k, static_cast<const T *>(resid),            \
        static_cast<T *>(out));                                                \
    break;
    ZQ_W2(0, float)
    ZQ_W2(1, __nv_bfloat16)
    ZQ_W2(2, half)
#undef ZQ_W2
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
