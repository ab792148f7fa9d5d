// zopilot-gpu patch: Q4K mat-vec kernels for decode — Mixtral's experts fused (w1‖w3 with
// SiLU·mul and the activation's int8 quantization in one kernel, w2 with the routing-weighted
// sum in another) and a plain mat-vec for up to 8 tokens.
//
// Layouts. Weights: GGUF/ggml Q4_K blocks (144 bytes per 256 values: half d, half dmin,
// 12 bytes of 6-bit scales and mins, 128 bytes of nibbles), rows contiguous, experts stacked
// `[E, N, K/256]`. Activations: our own int8 layout, `q[rows][K]` (int8) and `d[rows][K/32]`
// (f32 scale per 32 values) — like ggml's Q8_1 but with the scales apart, so that a lane
// reads 16 activation bytes with one aligned 16-byte load.
//
// Work split: one warp per weight row; 8 lanes per Q4_K block, so a warp covers 4 blocks
// (576 contiguous bytes) per step and each lane loads the block header (16 bytes, shared
// by its 8 lanes through L1) and 16 bytes of nibbles = 32 values: 16 of sub-block 2g (low
// nibbles) and 16 of sub-block 2g+1 (high nibbles), g = lane/2 % 4. Dot products by dp4a,
// the min term from the lane's own sum of activations (as ggml's vec_dot_q4_K_q8_1 does).
// Launchers return cudaGetLastError().

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace zq {

constexpr int QK = 256;      // values per Q4_K block
constexpr int QB = 144;      // bytes per Q4_K block
constexpr int Q8 = 32;       // activation values per scale
constexpr int WARPS = 8;     // warps per thread block
constexpr int MAX_TOKENS = 8;

struct ActRow {
  const int8_t *q; // K values
  const float *d;  // K / 32 scales
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ uint32_t scale_byte(const uint4 &hd, int i) {
  const uint32_t w = i < 4 ? hd.y : (i < 8 ? hd.z : hd.w);
  return (w >> (8 * (i & 3))) & 0xFF;
}

// ggml's get_scale_min_k4 on the header's scale bytes.
__device__ __forceinline__ void scale_min(const uint4 &hd, int j, float &sc,
                                          float &m) {
  if (j < 4) {
    sc = (float)(scale_byte(hd, j) & 63);
    m = (float)(scale_byte(hd, j + 4) & 63);
  } else {
    sc = (float)((scale_byte(hd, j + 4) & 0xF) |
                 ((scale_byte(hd, j - 4) >> 6) << 4));
    m = (float)((scale_byte(hd, j + 4) >> 4) | ((scale_byte(hd, j) >> 6) << 4));
  }
}

// A lane's activations for one Q4_K block: 16 values of each of its two sub-blocks.
struct LaneAct {
  int4 lo, hi;
  float dlo, dhi;
  int slo, shi; // sums of the int8 values
};

__device__ __forceinline__ int dp4(const int4 &a, const int4 &b) {
  int s = __dp4a(a.x, b.x, 0);
  s = __dp4a(a.y, b.y, s);
  s = __dp4a(a.z, b.z, s);
  return __dp4a(a.w, b.w, s);
}

__device__ __forceinline__ LaneAct load_act(const ActRow &x, int blk, int g,
                                            int h) {
  const int v0 = blk * QK + 64 * g + 16 * h;
  LaneAct a;
  a.lo = __ldg(reinterpret_cast<const int4 *>(x.q + v0));
  a.hi = __ldg(reinterpret_cast<const int4 *>(x.q + v0 + 32));
  a.dlo = __ldg(x.d + v0 / Q8);
  a.dhi = __ldg(x.d + v0 / Q8 + 1);
  const int4 ones = make_int4(0x01010101, 0x01010101, 0x01010101, 0x01010101);
  a.slo = dp4(ones, a.lo);
  a.shi = dp4(ones, a.hi);
  return a;
}

struct LaneW {
  uint4 hd; // d, dmin, scales
  uint4 q;  // 16 bytes of nibbles
};

__device__ __forceinline__ LaneW load_w(const uint8_t *row, int blk, int g,
                                        int h) {
  const uint8_t *b = row + (size_t)blk * QB;
  LaneW w;
  w.hd = __ldcs(reinterpret_cast<const uint4 *>(b));
  w.q = __ldcs(reinterpret_cast<const uint4 *>(b + 16 + 32 * g + 16 * h));
  return w;
}

__device__ __forceinline__ float lane_dot(const LaneW &w, const LaneAct &a,
                                          int g) {
  float sc0, m0, sc1, m1;
  scale_min(w.hd, 2 * g, sc0, m0);
  scale_min(w.hd, 2 * g + 1, sc1, m1);
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

// U consecutive steps of a lane's loop over a row's blocks (blk = base + 4u), loaded
// before any is used so that U loads per row are in flight at once.
template <int U>
__device__ __forceinline__ void load_steps(const uint8_t *row, int base, int nb,
                                           int g, int h, LaneW (&w)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (base + 4 * u < nb)
      w[u] = load_w(row, base + 4 * u, g, h);
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_float(half v) {
  return __half2float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ half from_float(float v) {
  return __float2half(v);
}

// f32 output rounded through the model's dtype (1 = bf16, 2 = f16), as a bf16 layer would
// have returned it: router logits keep the same values as the unfused path's.
template <int ROUND> __device__ __forceinline__ float round_via(float v) {
  if (ROUND == 1)
    return __bfloat162float(__float2bfloat16(v));
  if (ROUND == 2)
    return __half2float(__float2half(v));
  return v;
}

// Lane `lane` of a warp holds value `v` of a 32-value group: writes the group's int8
// values and scale (ggml's Q8 rounding: d = amax / 127, q = round(v / d)).
__device__ __forceinline__ void quantize_group(float v, int lane, int8_t *q,
                                               float *d) {
  const float amax = warp_max(fabsf(v));
  const float scale = amax / 127.0f;
  q[lane] = amax == 0.0f ? 0 : (int8_t)roundf(v / scale);
  if (lane == 0)
    *d = scale;
}

// x [rows, K] (row stride in elements) → q [rows, K], d [rows, K/32]. One warp per group.
template <typename T>
__global__ void quantize_kernel(const T *__restrict__ x, long long stride,
                                int rows, int k, int8_t *__restrict__ q,
                                float *__restrict__ d) {
  const int groups = k / Q8;
  const long long gw = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (gw >= (long long)rows * groups)
    return;
  const int r = (int)(gw / groups), g = (int)(gw % groups);
  const float v = to_float(x[r * stride + g * Q8 + lane]);
  quantize_group(v, lane, q + (size_t)r * k + g * Q8, d + (size_t)r * groups + g);
}

// Experts' w1 and w3 for (token, slot) pair blockIdx.y, rows blockIdx.x*32 .. +32 (4 per
// warp): act = silu(x·w1) * (x·w3), written quantized (one 32-value group per block).
__global__ void __launch_bounds__(WARPS * 32)
    moe_w13_silu_kernel(const uint8_t *__restrict__ w1,
                        const uint8_t *__restrict__ w3,
                        const uint32_t *__restrict__ ids, int topk,
                        const int8_t *__restrict__ xq,
                        const float *__restrict__ xd, int n, int k,
                        int8_t *__restrict__ aq, float *__restrict__ ad) {
  __shared__ float act[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int pair = blockIdx.y, token = pair / topk;
  const size_t e = ids[pair];
  const int nb = k / QK;
  const size_t row_bytes = (size_t)nb * QB;
  const ActRow x{xq + (size_t)token * k, xd + (size_t)token * (k / Q8)};
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  const int row0 = blockIdx.x * 32 + warp * 4;
  const uint8_t *r1 = w1 + (e * n + row0) * row_bytes;
  const uint8_t *r3 = w3 + (e * n + row0) * row_bytes;
  float gate[4] = {0, 0, 0, 0}, up[4] = {0, 0, 0, 0};
  for (int blk = lane >> 3; blk < nb; blk += 4) {
    const LaneAct a = load_act(x, blk, g, h);
    LaneW wg[4], wu[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      wg[r] = load_w(r1 + r * row_bytes, blk, g, h);
      wu[r] = load_w(r3 + r * row_bytes, blk, g, h);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      gate[r] += lane_dot(wg[r], a, g);
      up[r] += lane_dot(wu[r], a, g);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float gs = warp_sum(gate[r]), us = warp_sum(up[r]);
    if (lane == 0)
      act[warp * 4 + r] = gs / (1.0f + __expf(-gs)) * us;
  }
  __syncthreads();
  if (warp == 0) {
    const size_t group = (size_t)pair * (n / Q8) + blockIdx.x;
    quantize_group(act[lane], lane, aq + group * Q8, ad + group);
  }
}

// Experts' w2 for token blockIdx.y, one output row per warp: the routing-weighted sum over
// the token's `topk` experts of act[token, slot] · w2[e][row], plus `resid` when given.
template <typename OUT>
__global__ void __launch_bounds__(WARPS * 32)
    moe_w2_kernel(const uint8_t *__restrict__ w2,
                  const uint32_t *__restrict__ ids,
                  const float *__restrict__ topw, int topk,
                  const int8_t *__restrict__ aq, const float *__restrict__ ad,
                  int n, int k, const OUT *__restrict__ resid,
                  OUT *__restrict__ out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int token = blockIdx.y;
  const int row = blockIdx.x * WARPS + warp;
  if (row >= n)
    return;
  const int nb = k / QK;
  const size_t row_bytes = (size_t)nb * QB;
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  float total = 0.0f;
  for (int s0 = 0; s0 < topk; s0 += 2) {
    const int slots = topk - s0 < 2 ? topk - s0 : 2;
    const uint8_t *rows[2];
    ActRow x[2];
    for (int s = 0; s < 2; ++s) {
      const int pair = token * topk + s0 + (s < slots ? s : 0);
      rows[s] = w2 + ((size_t)ids[pair] * n + row) * row_bytes;
      x[s] = ActRow{aq + (size_t)pair * k, ad + (size_t)pair * (k / Q8)};
    }
    float acc[2] = {0, 0};
    constexpr int U = 4;
    for (int base = lane >> 3; base < nb; base += 4 * U) {
      LaneW w[2][U];
#pragma unroll
      for (int s = 0; s < 2; ++s)
        load_steps<U>(rows[s], base, nb, g, h, w[s]);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + 4 * u < nb) {
#pragma unroll
          for (int s = 0; s < 2; ++s)
            acc[s] += lane_dot(w[s][u], load_act(x[s], base + 4 * u, g, h), g);
        }
    }
    for (int s = 0; s < slots; ++s)
      total += topw[token * topk + s0 + s] * acc[s];
  }
  total = warp_sum(total);
  if (lane == 0) {
    const size_t i = (size_t)token * n + row;
    // With a residual: resid + ys, each rounded to OUT as the unfused add would see them.
    out[i] = resid ? from_float<OUT>(to_float(resid[i]) +
                                     to_float(from_float<OUT>(total)))
                   : from_float<OUT>(total);
  }
}

// One warp per (output row, slot): the row's dot product with the slot's activation, then the
// block adds its rows' slots (in slot order, routing-weighted) through shared memory. A block
// is WARPS / topk rows × topk slots (topk ≤ WARPS): twice the warps of moe_w2_kernel for
// Mixtral's top-2, with fewer registers each, so more of the row stream is in flight.
template <typename OUT>
__global__ void __launch_bounds__(WARPS * 32)
    moe_w2_split_kernel(const uint8_t *__restrict__ w2,
                        const uint32_t *__restrict__ ids,
                        const float *__restrict__ topw, int topk,
                        const int8_t *__restrict__ aq,
                        const float *__restrict__ ad, int n, int k,
                        const OUT *__restrict__ resid, OUT *__restrict__ out) {
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
    const ActRow x{aq + (size_t)pair * k, ad + (size_t)pair * (k / Q8)};
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
      const size_t i = (size_t)token * n + orow;
      out[i] = resid ? from_float<OUT>(to_float(resid[i]) +
                                       to_float(from_float<OUT>(total)))
                     : from_float<OUT>(total);
    }
  }
}

// Router logits (one warp per expert, rounded through ROUND as the model's dtype would) and
// top-k routing for token blockIdx.x in one block: the k largest logits (lowest index on
// ties) and their softmax, as mistral.rs' topk_softmax computes it. experts ≤ 256, topk ≤ 8.
template <int ROUND>
__global__ void __launch_bounds__(WARPS * 32)
    router_topk_kernel(const uint8_t *__restrict__ w, int experts, int k,
                       const int8_t *__restrict__ xq,
                       const float *__restrict__ xd, int topk,
                       uint32_t *__restrict__ ids, float *__restrict__ weights) {
  __shared__ float logits[256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int token = blockIdx.x;
  const int nb = k / QK;
  const size_t row_bytes = (size_t)nb * QB;
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  const ActRow x{xq + (size_t)token * k, xd + (size_t)token * (k / Q8)};
  for (int e = warp; e < experts; e += WARPS) {
    float acc = 0.0f;
    for (int blk = lane >> 3; blk < nb; blk += 4)
      acc += lane_dot(load_w(w + e * row_bytes, blk, g, h), load_act(x, blk, g, h), g);
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

// Up to three weight matrices with the same row length, one launch: their rows numbered
// one after another, a warp per row; `rows_end` is cumulative.
struct MvJobs {
  const uint8_t *w[3];
  void *out[3];
  int rows_end[3];
  int count;
};

// y[t, row] = x[t] · w[row] for NT tokens, one row per warp, each weight byte read once.
template <int NT, typename OUT, int ROUND>
__global__ void __launch_bounds__(WARPS * 32)
    matvec_kernel(const MvJobs jobs, int k, const int8_t *__restrict__ xq,
                  const float *__restrict__ xd) {
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
        for (int t = 0; t < NT; ++t) {
          const ActRow x{xq + (size_t)t * k, xd + (size_t)t * (k / Q8)};
          acc[t] += lane_dot(wv[u], load_act(x, base + 4 * u, g, h), g);
        }
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
                   const MvJobs &jobs, int k, const int8_t *xq,
                   const float *xd) {
  switch (tokens) {
#define ZQ_MV(NT)                                                              \
  case NT:                                                                     \
    matvec_kernel<NT, OUT, ROUND><<<grid, block, 0, st>>>(jobs, k, xq, xd);    \
    break;
    ZQ_MV(1) ZQ_MV(2) ZQ_MV(3) ZQ_MV(4) ZQ_MV(5) ZQ_MV(6) ZQ_MV(7) ZQ_MV(8)
#undef ZQ_MV
  default:
    break;
  }
}

// RMSNorm (candle's arithmetic: f32 sum of squares, scale * x * alpha rounded to T) of
// `x`, or of h = x + resid (rounded to T, written to `h_out`), quantized for the
// mat-vec. One 1024-thread block per row; k % 32 == 0, so each warp's 32 values of an
// iteration are one quantization group.
template <typename T>
__global__ void __launch_bounds__(1024)
    rmsnorm_quantize_kernel(const T *__restrict__ x, const T *__restrict__ resid,
                            T *__restrict__ h_out, const T *__restrict__ alpha,
                            int k, float eps, int8_t *__restrict__ q,
                            float *__restrict__ d) {
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
    quantize_group(y, lane, q + row * k + (col - lane), d + row * (k / Q8) + col / Q8);
  }
}

// Q4_K blocks → f16 values (ggml's dequantize_row_q4_K arithmetic: d·sc·q − dmin·m in f32),
// 8 threads per block, each writing two runs of 16 values with 16-byte stores.
__global__ void dequant_q4k_f16_kernel(const uint8_t *__restrict__ src,
                                       half *__restrict__ dst, long long nblocks) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long blk = t / 8;
  if (blk >= nblocks)
    return;
  const int sub = (int)(t % 8), g = sub >> 1, h = sub & 1;
  const LaneW w = load_w(src + blk * QB, 0, g, h);
  float sc0, m0, sc1, m1;
  scale_min(w.hd, 2 * g, sc0, m0);
  scale_min(w.hd, 2 * g + 1, sc1, m1);
  const float2 dm = __half22float2(*reinterpret_cast<const half2 *>(&w.hd.x));
  const float d0 = dm.x * sc0, n0 = dm.y * m0, d1 = dm.x * sc1, n1 = dm.y * m1;
  const uint32_t q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
  uint32_t lo[8], hi[8]; // two f16 values a word, in memory order
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t b0 = (q[j / 2] >> (16 * (j % 2))) & 0xFF;
    const uint32_t b1 = (q[j / 2] >> (16 * (j % 2) + 8)) & 0xFF;
    union {
      half2 h;
      uint32_t u;
    } l, u;
    l.h = __floats2half2_rn(d0 * (float)(b0 & 0xF) - n0, d0 * (float)(b1 & 0xF) - n0);
    u.h = __floats2half2_rn(d1 * (float)(b0 >> 4) - n1, d1 * (float)(b1 >> 4) - n1);
    lo[j] = l.u;
    hi[j] = u.u;
  }
  half *out = dst + blk * QK + 64 * g + 16 * h;
  uint4 *o_lo = reinterpret_cast<uint4 *>(out);
  uint4 *o_hi = reinterpret_cast<uint4 *>(out + 32);
  o_lo[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  o_lo[1] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
  o_hi[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  o_hi[1] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
}

} // namespace zq

// dtype codes: 0 = f32, 1 = bf16, 2 = f16; for the mat-vec also 3 / 4 = f32 rounded
// through bf16 / f16.

extern "C" int zopilot_q8_quantize(const void *x, int dtype, long long stride,
                                   int rows, int k, int8_t *q, float *d,
                                   long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = (long long)rows * (k / zq::Q8) * 32;
  const dim3 block(256), grid((unsigned)((threads + 255) / 256));
  switch (dtype) {
  case 0:
    zq::quantize_kernel<float><<<grid, block, 0, st>>>(
        static_cast<const float *>(x), stride, rows, k, q, d);
    break;
  case 1:
    zq::quantize_kernel<__nv_bfloat16><<<grid, block, 0, st>>>(
        static_cast<const __nv_bfloat16 *>(x), stride, rows, k, q, d);
    break;
  case 2:
    zq::quantize_kernel<half><<<grid, block, 0, st>>>(
        static_cast<const half *>(x), stride, rows, k, q, d);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// w1, w3: [E, n, k] Q4_K; ids: [pairs] (token-major, `topk` per token); x: [tokens, k]
// quantized; act out: [pairs, n] quantized. n % 32 == 0, k % 256 == 0.
extern "C" int zopilot_moe_w13_silu(const void *w1, const void *w3,
                                    const uint32_t *ids, int pairs, int topk,
                                    const int8_t *xq, const float *xd, int n,
                                    int k, int8_t *aq, float *ad,
                                    long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(n / 32, pairs), block(zq::WARPS * 32);
  zq::moe_w13_silu_kernel<<<grid, block, 0, st>>>(
      static_cast<const uint8_t *>(w1), static_cast<const uint8_t *>(w3), ids,
      topk, xq, xd, n, k, aq, ad);
  return (int)cudaGetLastError();
}

// w2: [E, n, k] Q4_K; act: [tokens * topk, k] quantized; resid (nullable) and out:
// [tokens, n] in `dtype`.
extern "C" int zopilot_moe_w2(const void *w2, const uint32_t *ids,
                              const float *topw, int tokens, int topk,
                              const int8_t *aq, const float *ad, int n, int k,
                              const void *resid, void *out, int dtype,
                              long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 block(zq::WARPS * 32);
  const uint8_t *w = static_cast<const uint8_t *>(w2);
  const bool split = topk <= zq::WARPS;
  const int rows_per_block = split ? zq::WARPS / topk : zq::WARPS;
  const dim3 grid((n + rows_per_block - 1) / rows_per_block, tokens);
  switch (dtype) {
#define ZQ_W2(CODE, T)                                                         \
  case CODE:                                                                   \
    if (split)                                                                 \
      zq::moe_w2_split_kernel<T><<<grid, block, 0, st>>>(                      \
          w, ids, topw, topk, aq, ad, n, k, static_cast<const T *>(resid),     \
          static_cast<T *>(out));                                              \
    else                                                                       \
      zq::moe_w2_kernel<T><<<grid, block, 0, st>>>(                            \
          w, ids, topw, topk, aq, ad, n, k, static_cast<const T *>(resid),     \
          static_cast<T *>(out));                                              \
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

// Router + top-k for `tokens` quantized rows: w [experts, k] Q4_K (experts ≤ 256);
// ids [tokens, topk] u32, weights [tokens, topk] f32 (topk ≤ 8). round: 0 none, 1 bf16, 2 f16.
extern "C" int zopilot_router_topk(const void *w, int experts, int k,
                                   const int8_t *xq, const float *xd, int tokens,
                                   int topk, int round, uint32_t *ids,
                                   float *weights, long long stream) {
  if (experts < 1 || experts > 256 || topk < 1 || topk > 8 || topk > experts)
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const uint8_t *wb = static_cast<const uint8_t *>(w);
  const dim3 grid(tokens), block(zq::WARPS * 32);
  switch (round) {
  case 0:
    zq::router_topk_kernel<0><<<grid, block, 0, st>>>(wb, experts, k, xq, xd, topk, ids, weights);
    break;
  case 1:
    zq::router_topk_kernel<1><<<grid, block, 0, st>>>(wb, experts, k, xq, xd, topk, ids, weights);
    break;
  case 2:
    zq::router_topk_kernel<2><<<grid, block, 0, st>>>(wb, experts, k, xq, xd, topk, ids, weights);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// `count` (1..3) weights w[i]: [n[i], k] Q4_K, one launch; x: [tokens, k] quantized
// (tokens 1..8); out[i]: [tokens, n[i]] in `dtype`. Callers with more tokens offset xq, xd
// and the outputs per launch of 8.
extern "C" int zopilot_q4k_matvec(const void *const *w, const int *n, void *const *out,
                                  int count, int k, const int8_t *xq,
                                  const float *xd, int tokens, int dtype,
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
  switch (dtype) {
  case 0:
    zq::launch_matvec<float>(tokens, grid, block, st, jobs, k, xq, xd);
    break;
  case 1:
    zq::launch_matvec<__nv_bfloat16>(tokens, grid, block, st, jobs, k, xq, xd);
    break;
  case 2:
    zq::launch_matvec<half>(tokens, grid, block, st, jobs, k, xq, xd);
    break;
  case 3:
    zq::launch_matvec<float, 1>(tokens, grid, block, st, jobs, k, xq, xd);
    break;
  case 4:
    zq::launch_matvec<float, 2>(tokens, grid, block, st, jobs, k, xq, xd);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// x, resid (nullable), h_out (written when resid is given): [rows, k]; alpha: [k]; all in
// `dtype` (0 f32, 1 bf16, 2 f16). q, d: the normalized rows quantized. k % 32 == 0.
extern "C" int zopilot_rmsnorm_quantize(const void *x, const void *resid,
                                        void *h_out, const void *alpha,
                                        int rows, int k, float eps, int dtype,
                                        int8_t *q, float *d, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(rows), block(1024);
  switch (dtype) {
#define ZQ_RMS(CODE, T)                                                        \
  case CODE:                                                                   \
    zq::rmsnorm_quantize_kernel<T><<<grid, block, 0, st>>>(                    \
        static_cast<const T *>(x), static_cast<const T *>(resid),              \
        static_cast<T *>(h_out), static_cast<const T *>(alpha), k, eps, q, d); \
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

// src: `nblocks` Q4_K blocks; dst: nblocks * 256 f16 values.
extern "C" int zopilot_q4k_dequant_f16(const void *src, void *dst,
                                       long long nblocks, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = nblocks * 8;
  zq::dequant_q4k_f16_kernel<<<(unsigned)((threads + 255) / 256), 256, 0, st>>>(
      static_cast<const uint8_t *>(src), static_cast<half *>(dst), nblocks);
  return (int)cudaGetLastError();
}
