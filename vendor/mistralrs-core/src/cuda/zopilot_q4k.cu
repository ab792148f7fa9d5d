// zopilot-gpu patch: Q4K kernels for decode — Mixtral's experts fused (w1‖w3 with SiLU·mul
// and the activation's int8 quantization in one kernel, w2 with the routing-weighted sum and
// the residual in another), router + top-k, RMSNorm fused with quantization, a mat-vec for
// up to 8 tokens and three weights per launch, and Q4K → f16 dequantization.
//
// Layouts. Weights: GGUF/ggml Q4_K blocks (144 bytes per 256 values: half d, half dmin,
// 12 bytes of 6-bit scales and mins, 128 bytes of nibbles), rows contiguous, experts stacked
// `[E, N, K/256]`. Activations: our own int8 layout (`Act`): `q[rows][K]` int8, `d[rows][K/32]`
// f32 scale per 32 values and `s[rows][K/16]` = d · (sum of the 16 int8 values) — like ggml's
// Q8_1 but with the scales apart, so that a lane reads its 16 activation bytes with one
// aligned 16-byte load, and with the sums per 16 values precomputed once per row instead of
// once per (row, weight row).
//
// Work split: one warp per weight row; 8 lanes per Q4_K block, so a warp covers 4 blocks
// (576 contiguous bytes) per step and each lane loads the block header (16 bytes, shared by
// its 8 lanes) and 16 bytes of nibbles = 32 values: 16 of sub-block 2g (low nibbles) and 16
// of sub-block 2g+1 (high nibbles), g = lane/2 % 4. Weights are read with ld.global.cs
// (streaming): on an H100 the read-only (nc) and plain loads were 10 % slower end to end.
// Dot products by dp4a; ggml's vec_dot_q4_K_q8_1 arithmetic. Launchers return
// cudaGetLastError().

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace zq {

constexpr int QK = 256; // values per Q4_K block
constexpr int QB = 144; // bytes per Q4_K block
constexpr int Q8 = 32;  // activation values per scale
constexpr int WARPS = 8; // warps per thread block (mat-vec, w2, router)
constexpr int MAX_TOKENS = 8;

// Quantized activation rows (see the layout above).
struct Act {
  int8_t *q;
  float *d;
  float *s;
};

// One row of `Act`.
struct ActRow {
  const int8_t *q;
  const float *d;
  const float *s;
};

__device__ __forceinline__ ActRow act_row(const Act &a, size_t row, int k) {
  return ActRow{a.q + row * k, a.d + row * (k / Q8), a.s + row * (k / 16)};
}

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

// Scales and mins of sub-blocks 2g and 2g+1 (ggml's get_scale_min_k4), branch-free: all
// eight 6-bit scales and mins assembled four to a word, then the lane's two bytes picked.
struct ScaleMin {
  float sc0, m0, sc1, m1;
};

__device__ __forceinline__ ScaleMin scale_min(const uint4 &hd, int g) {
  const uint32_t a = hd.y, b = hd.z, c = hd.w; // scale bytes 0-3, 4-7, 8-11
  const uint32_t sc_lo = a & 0x3f3f3f3fu;      // sub-blocks 0-3
  const uint32_t m_lo = b & 0x3f3f3f3fu;
  const uint32_t sc_hi = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u); // 4-7
  const uint32_t m_hi = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
  const int shift = 16 * (g & 1);
  const uint32_t sc = (g < 2 ? sc_lo : sc_hi) >> shift;
  const uint32_t m = (g < 2 ? m_lo : m_hi) >> shift;
  return ScaleMin{(float)(sc & 0xFF), (float)(m & 0xFF), (float)((sc >> 8) & 0xFF),
                  (float)((m >> 8) & 0xFF)};
}

// A lane's activations for one Q4_K block: 16 values of each of its two sub-blocks.
struct LaneAct {
  int4 lo, hi;
  float dlo, dhi;
  float slo, shi; // d · sum of the int8 values
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
  a.slo = __ldg(x.s + v0 / 16);
  a.shi = __ldg(x.s + v0 / 16 + 2);
  return a;
}

// Σ over the lane's 32 values of weight · activation.
__device__ __forceinline__ float lane_dot(const LaneW &w, const LaneAct &a,
                                          int g) {
  const ScaleMin sm = scale_min(w.hd, g);
  const int4 lo = make_int4(w.q.x & 0x0F0F0F0F, w.q.y & 0x0F0F0F0F,
                            w.q.z & 0x0F0F0F0F, w.q.w & 0x0F0F0F0F);
  const int4 hi =
      make_int4((w.q.x >> 4) & 0x0F0F0F0F, (w.q.y >> 4) & 0x0F0F0F0F,
                (w.q.z >> 4) & 0x0F0F0F0F, (w.q.w >> 4) & 0x0F0F0F0F);
  const float2 dm = __half22float2(*reinterpret_cast<const half2 *>(&w.hd.x));
  const float dot = a.dlo * sm.sc0 * (float)dp4(lo, a.lo) +
                    a.dhi * sm.sc1 * (float)dp4(hi, a.hi);
  return dm.x * dot - dm.y * (sm.m0 * a.slo + sm.m1 * a.shi);
}

// The w13 kernel's arithmetic: activation sums by dp4a in the lane (its eight weight rows
// share one activation load, so the sums cost no extra load there) and ggml's branchy scale
// decode. Measured on an H100 against the precomputed sums and branch-free decode above in
// that kernel (run Z, same run): one stream ITL 1.70 against 1.78 ms. w2 and the mat-vec,
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

// Lane `lane` of a warp holds value `v` of a 32-value group starting at element `first` of
// `out`: writes the int8 values, the scale (ggml's Q8 rounding: d = amax / 127,
// q = round(v / d)) and the two 16-value sums.
__device__ __forceinline__ void quantize_group(float v, int lane, const Act &out,
                                               size_t first) {
  const float amax = warp_max(fabsf(v));
  const float scale = amax / 127.0f;
  const int q = amax == 0.0f ? 0 : (int)roundf(v / scale);
  out.q[first + lane] = (int8_t)q;
  int sum = q;
#pragma unroll
  for (int o = 8; o > 0; o >>= 1)
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0)
    out.d[first / Q8] = scale;
  if ((lane & 15) == 0)
    out.s[first / 16 + lane / 16] = scale * (float)sum;
}

// x [rows, K] (row stride in elements) → Act rows. One warp per group.
template <typename T>
__global__ void quantize_kernel(const T *__restrict__ x, long long stride,
                                int rows, int k, Act out) {
  const int groups = k / Q8;
  const long long gw = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (gw >= (long long)rows * groups)
    return;
  const int r = (int)(gw / groups), g = (int)(gw % groups);
  const float v = to_float(x[r * stride + g * Q8 + lane]);
  quantize_group(v, lane, out, (size_t)r * k + g * Q8);
}

// Experts' w1 and w3 for (token, slot) pair blockIdx.y, rows blockIdx.x*32 .. +32 (4 per
// warp, 8 warps): act = silu(x·w1) * (x·w3), written quantized (the block's 32 rows are one
// quantization group). Four rows of each matrix per warp keep 8 row streams in flight per
// lane; two rows per warp with twice the warps was 35 % slower on an H100 (ncu).
__global__ void __launch_bounds__(WARPS * 32)
    moe_w13_silu_kernel(const uint8_t *__restrict__ w1,
                        const uint8_t *__restrict__ w3,
                        const uint32_t *__restrict__ ids, int topk, Act x_all,
                        int n, int k, Act act_out) {
  __shared__ float act[32];
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
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float gs = warp_sum(gate[r]), us = warp_sum(up[r]);
    if (lane == 0)
      act[warp * 4 + r] = gs / (1.0f + __expf(-gs)) * us;
  }
  __syncthreads();
  if (warp == 0)
    quantize_group(act[lane], lane, act_out, (size_t)pair * n + blockIdx.x * 32);
}

// One warp per (output row, slot): the row's dot product with the slot's activation, then the
// block adds its rows' slots (in slot order, routing-weighted) through shared memory, plus
// `resid` when given. A block is WARPS / topk rows × topk slots (topk ≤ WARPS).
template <typename OUT>
__global__ void __launch_bounds__(WARPS * 32)
    moe_w2_kernel(const uint8_t *__restrict__ w2, const uint32_t *__restrict__ ids,
                  const float *__restrict__ topw, int topk, Act act, int n, int k,
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
      const size_t i = (size_t)token * n + orow;
      // With a residual: resid + ys, each rounded to OUT as the unfused add would see them.
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
    router_topk_kernel(const uint8_t *__restrict__ w, int experts, int k, Act x_all,
                       int topk, uint32_t *__restrict__ ids,
                       float *__restrict__ weights) {
  __shared__ float logits[256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int token = blockIdx.x;
  const int nb = k / QK;
  const size_t row_bytes = (size_t)nb * QB;
  const int sub = lane & 7, g = sub >> 1, h = sub & 1;
  const ActRow x = act_row(x_all, token, k);
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
    matvec_kernel(const MvJobs jobs, int k, Act x_all) {
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
    matvec_kernel<NT, OUT, ROUND><<<grid, block, 0, st>>>(jobs, k, x);         \
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
                            int k, float eps, Act out) {
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
  const ScaleMin sm = scale_min(w.hd, g);
  const float2 dm = __half22float2(*reinterpret_cast<const half2 *>(&w.hd.x));
  const float d0 = dm.x * sm.sc0, n0 = dm.y * sm.m0, d1 = dm.x * sm.sc1,
              n1 = dm.y * sm.m1;
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
// through bf16 / f16. Activations: q [rows, k] int8, d [rows, k/32] f32, s [rows, k/16] f32.

static zq::Act act(const int8_t *q, const float *d, const float *s) {
  return zq::Act{const_cast<int8_t *>(q), const_cast<float *>(d), const_cast<float *>(s)};
}

extern "C" int zopilot_q8_quantize(const void *x, int dtype, long long stride,
                                   int rows, int k, int8_t *q, float *d, float *s,
                                   long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = (long long)rows * (k / zq::Q8) * 32;
  const dim3 block(256), grid((unsigned)((threads + 255) / 256));
  const zq::Act out = act(q, d, s);
  switch (dtype) {
  case 0:
    zq::quantize_kernel<float><<<grid, block, 0, st>>>(
        static_cast<const float *>(x), stride, rows, k, out);
    break;
  case 1:
    zq::quantize_kernel<__nv_bfloat16><<<grid, block, 0, st>>>(
        static_cast<const __nv_bfloat16 *>(x), stride, rows, k, out);
    break;
  case 2:
    zq::quantize_kernel<half><<<grid, block, 0, st>>>(
        static_cast<const half *>(x), stride, rows, k, out);
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
                                    const int8_t *xq, const float *xd,
                                    const float *xs, int n, int k, int8_t *aq,
                                    float *ad, float *as, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(n / 32, pairs), block(zq::WARPS * 32);
  zq::moe_w13_silu_kernel<<<grid, block, 0, st>>>(
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
    zq::moe_w2_kernel<T><<<grid, block, 0, st>>>(                              \
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
    zq::router_topk_kernel<0><<<grid, block, 0, st>>>(wb, experts, k, x, topk, ids, weights);
    break;
  case 1:
    zq::router_topk_kernel<1><<<grid, block, 0, st>>>(wb, experts, k, x, topk, ids, weights);
    break;
  case 2:
    zq::router_topk_kernel<2><<<grid, block, 0, st>>>(wb, experts, k, x, topk, ids, weights);
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

// x, resid (nullable), h_out (written when resid is given): [rows, k]; alpha: [k]; all in
// `dtype` (0 f32, 1 bf16, 2 f16). The normalized rows quantized into q, d, s. k % 32 == 0.
extern "C" int zopilot_rmsnorm_quantize(const void *x, const void *resid,
                                        void *h_out, const void *alpha,
                                        int rows, int k, float eps, int dtype,
                                        int8_t *q, float *d, float *s,
                                        long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(rows), block(1024);
  const zq::Act out = act(q, d, s);
  switch (dtype) {
#define ZQ_RMS(CODE, T)                                                        \
  case CODE:                                                                   \
    zq::rmsnorm_quantize_kernel<T><<<grid, block, 0, st>>>(                    \
        static_cast<const T *>(x), static_cast<const T *>(resid),              \
        static_cast<T *>(h_out), static_cast<const T *>(alpha), k, eps, out);  \
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
