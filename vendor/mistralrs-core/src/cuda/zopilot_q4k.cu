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
#include <type_traits>
#include <stdint.h>

#include <utility>

namespace zq {

constexpr int QK = 256; // values per Q4_K block
constexpr int QB = 144; // bytes per Q4_K block
constexpr int Q8 = 32;  // activation values per scale
constexpr int WARPS = 8; // warps per thread block (mat-vec, w2, router)
constexpr int MAX_TOKENS = 8;

// Programmatic dependent launch (Hopper and later; `zopilot_set_pdl`): a kernel launched with
// the attribute may start while the previous kernel in the stream finishes, so its launch
// and ramp-up overlap that kernel's tail instead of following its completion. Every kernel
// here begins with `pdl_enter`: wait until the previous grid has completed and its writes
// are visible (a no-op when launched without the attribute), then let the next kernel
// launch. Kernels of others (candle, paged attention) are launched without the attribute,
// so they keep full stream order.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static int g_pdl = 0; // set once by zopilot_set_pdl

// `kernel<<<grid, block, smem, st>>>(args...)`, with the programmatic-launch attribute when on.
template <typename... Params, typename... Args>
static void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t st, Args &&...args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cfg.attrs = attr;
  cfg.numAttrs = g_pdl ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

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

// A read-only-cache load, or (NC false: data the same kernel wrote) a plain one.
template <bool NC, typename V> __device__ __forceinline__ V ld(const V *p) {
  if constexpr (NC)
    return __ldg(p);
  else
    return *p;
}

template <bool NC = true>
__device__ __forceinline__ LaneAct load_act(const ActRow &x, int blk, int g,
                                            int h) {
  const int v0 = blk * QK + 64 * g + 16 * h;
  LaneAct a;
  a.lo = ld<NC>(reinterpret_cast<const int4 *>(x.q + v0));
  a.hi = ld<NC>(reinterpret_cast<const int4 *>(x.q + v0 + 32));
  a.dlo = ld<NC>(x.d + v0 / Q8);
  a.dhi = ld<NC>(x.d + v0 / Q8 + 1);
  a.slo = ld<NC>(x.s + v0 / 16);
  a.shi = ld<NC>(x.s + v0 / 16 + 2);
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

// out[i] = the MoE block's output `total`, plus resid[i] when given — each rounded to OUT as
// the unfused add would see them.
template <typename OUT>
__device__ __forceinline__ void store_moe_out(OUT *out, const OUT *resid, size_t i, float total) {
  out[i] = resid ? from_float<OUT>(to_float(resid[i]) + to_float(from_float<OUT>(total)))
                 : from_float<OUT>(total);
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

// The round_via code of a model dtype T (router logits come back in it).
template <typename T> __host__ __device__ constexpr int round_code() {
  return std::is_same<T, __nv_bfloat16>::value ? 1 : (std::is_same<T, half>::value ? 2 : 0);
}

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

// Q4_K blocks → f16 values (ggml's dequantize_row_q4_K arithmetic: d·sc·q − dmin·m in f32),
// 8 threads per block, each writing two runs of 16 values with 16-byte stores.
__global__ void dequant_q4k_f16_kernel(const uint8_t *__restrict__ src,
                                       half *__restrict__ dst, long long nblocks) {
  pdl_enter();
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

// ---- Grouped MoE decode (3 to a few dozen tokens): the (token, expert) pairs grouped by
// expert on the device, each expert's weights read once per chunk of up to 8 or 16 pairs
// routed to it (the per-pair kernels above read an expert once per pair), on tensor cores.

// Pairs (token * topk + slot) grouped by expert: `order` lists them expert by expert (pair
// order within an expert), `chunks[i]` = {expert, first index into order, count ≤ nt, 0};
// entries past the last chunk have count 0. One block; pairs ≤ 4096, experts ≤ 256.
__global__ void __launch_bounds__(1024)
    moe_plan_kernel(const uint32_t *__restrict__ ids, int pairs, int experts, int nt,
                    int max_chunks, int *__restrict__ order, int4 *__restrict__ chunks) {
  pdl_enter();
  __shared__ int count[256], offset[256];
  __shared__ uint32_t sid[4096];
  for (int e = threadIdx.x; e < experts; e += blockDim.x)
    count[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const uint32_t e = min(ids[p], (uint32_t)experts - 1);
    sid[p] = e;
    atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int at = 0, c = 0;
    for (int e = 0; e < experts; ++e) {
      offset[e] = at;
      for (int i = 0; i < count[e]; i += nt)
        chunks[c++] = make_int4(e, at + i, min(nt, count[e] - i), 0);
      at += count[e];
    }
    for (; c < max_chunks; ++c)
      chunks[c] = make_int4(0, 0, 0, 0);
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const uint32_t e = sid[p];
    int before = 0;
    for (int q = 0; q < p; ++q)
      before += sid[q] == e;
    order[offset[e] + before] = p;
  }
}

// The chunk's pairs (and their tokens) into shared memory; returns the chunk.
template <int NT>
__device__ __forceinline__ int4 load_chunk(const int4 *chunks, const int *order, int topk,
                                           int (&pair)[NT], int (&token)[NT]) {
  const int4 c = chunks[blockIdx.y];
  if (threadIdx.x < NT && c.z > 0) {
    const int p = order[c.y + min((int)threadIdx.x, c.z - 1)];
    pair[threadIdx.x] = p;
    token[threadIdx.x] = p / topk;
  }
  __syncthreads();
  return c;
}

// out[token, row] = Σ_slot topw · y[token * topk + slot, row] in slot order, plus `resid`
// when given, as `moe_w2_kernel` rounds them.
template <typename OUT>
__global__ void moe_combine_kernel(const float *__restrict__ y, const float *__restrict__ topw,
                                   int topk, int n, const OUT *__restrict__ resid,
                                   OUT *__restrict__ out) {
  pdl_enter();
  const int token = blockIdx.y;
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= n)
    return;
  float total = 0.0f;
  for (int s = 0; s < topk; ++s) {
    const size_t pair = (size_t)token * topk + s;
    total += topw[pair] * y[pair * n + row];
  }
  store_moe_out(out, resid, (size_t)token * n + row, total);
}

// The grouped expert kernels: int8 mma.sync m16n8k32 per Q4_K
// sub-block (32 values: one scale and min per weight row, one scale per activation row),
// a warp computing 16 weight rows × 8·NB pairs; the sub-block's int32 products fixed up in
// f32 per (row, pair) as ggml's arithmetic does per 32 values:
// d·sc·dₐ·Σ(q·qₐ) − dmin·m·dₐ·Σqₐ.
// The k order inside an mma is permuted the same way for both operands (a thread's a0/a2 and
// b0/b1 hold 8 consecutive values), so each thread reads 8 contiguous nibble bytes per row
// and 8 contiguous activation bytes per pair.

__device__ __forceinline__ void mma_s8(int (&c)[4], const int (&a)[4], int b0, int b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
               : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

// One matrix's 16-row tile (rows gq and gq+8 of this lane) over one Q4_K block: the lane's
// header words and nibble bytes for its two rows.
struct TileW {
  uint4 hd[2];
  uint2 q[2][4]; // [row][64-value group]
};

__device__ __forceinline__ TileW load_tile(const uint8_t *row_g, const uint8_t *row_g8,
                                           int blk, int tq) {
  TileW w;
  const uint8_t *b[2] = {row_g + (size_t)blk * QB, row_g8 + (size_t)blk * QB};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    w.hd[r] = __ldcs(reinterpret_cast<const uint4 *>(b[r]));
#pragma unroll
    for (int gi = 0; gi < 4; ++gi)
      w.q[r][gi] = __ldcs(reinterpret_cast<const uint2 *>(b[r] + 16 + 32 * gi + 8 * tq));
  }
  return w;
}

// Activations of a chunk's pairs packed for the mma kernels (`moe_pack_kernel`): per chunk,
// per sub-block j (32 values) and n-tile, the 8 pairs' 32 int8 values contiguous (256 bytes:
// a warp's B fragments are one contiguous read), and per pair of sub-blocks (j0 = 2i, j0+1)
// and n-tile the 8 pairs' {dₐ(j0), dₐ(j0+1), dₐ·Σqₐ(j0), dₐ·Σqₐ(j0+1)}.
struct Packed {
  const int8_t *q;
  const float4 *f;
};

// acc[nb][i] (i: c-fragment order — rows gq, gq, gq+8, gq+8 × chunk slots 2tq, 2tq+1) +=
// the tile's block `blk` times chunk `c`'s packed activations.
template <int NB>
__device__ __forceinline__ void tile_mma(const TileW &w, const Packed &x, int k, int c, int blk,
                                         int gq, int tq, float (&acc)[NB][4]) {
  const float2 dm0 = __half22float2(*reinterpret_cast<const half2 *>(&w.hd[0].x));
  const float2 dm1 = __half22float2(*reinterpret_cast<const half2 *>(&w.hd[1].x));
  const size_t subs = (size_t)c * (k / Q8) + blk * 8, pairs = (size_t)c * (k / 64) + blk * 4;
#pragma unroll
  for (int gi = 0; gi < 4; ++gi) {
    const ScaleMin s0 = scale_min(w.hd[0], gi), s1 = scale_min(w.hd[1], gi);
    // [row][sub-block 2gi, 2gi+1]
    const float dsc[2][2] = {{dm0.x * s0.sc0, dm0.x * s0.sc1}, {dm1.x * s1.sc0, dm1.x * s1.sc1}};
    const float dmn[2][2] = {{dm0.y * s0.m0, dm0.y * s0.m1}, {dm1.y * s1.m0, dm1.y * s1.m1}};
    const int alo[4] = {(int)(w.q[0][gi].x & 0x0F0F0F0Fu), (int)(w.q[1][gi].x & 0x0F0F0F0Fu),
                        (int)(w.q[0][gi].y & 0x0F0F0F0Fu), (int)(w.q[1][gi].y & 0x0F0F0F0Fu)};
    const int ahi[4] = {(int)((w.q[0][gi].x >> 4) & 0x0F0F0F0Fu),
                        (int)((w.q[1][gi].x >> 4) & 0x0F0F0F0Fu),
                        (int)((w.q[0][gi].y >> 4) & 0x0F0F0F0Fu),
                        (int)((w.q[1][gi].y >> 4) & 0x0F0F0F0Fu)};
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int8_t *xb = x.q + ((subs + 2 * gi) * NB + nb) * 256 + gq * 32 + 8 * tq;
      const uint2 b_lo = __ldg(reinterpret_cast<const uint2 *>(xb));
      const uint2 b_hi = __ldg(reinterpret_cast<const uint2 *>(xb + NB * 256));
      int clo[4], chi[4];
      mma_s8(clo, alo, (int)b_lo.x, (int)b_lo.y);
      mma_s8(chi, ahi, (int)b_hi.x, (int)b_hi.y);
      const float4 *f = x.f + ((pairs + gi) * NB + nb) * 8 + 2 * tq;
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const float4 a = __ldg(f + cc); // dₐ lo, dₐ hi, S lo, S hi
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float &o = acc[nb][2 * r + cc];
          o += dsc[r][0] * a.x * (float)clo[2 * r + cc] - dmn[r][0] * a.z;
          o += dsc[r][1] * a.y * (float)chi[2 * r + cc] - dmn[r][1] * a.w;
        }
      }
    }
  }
}

// Sums `acc` over the S warps of a block that split one tile's K (warp = tile + TILES·slice)
// through shared memory `red`; slice 0's lanes get the totals.
template <int NB, int S, int TILES>
__device__ __forceinline__ void reduce_slices(float (&acc)[NB][4], float *red, int tile,
                                              int slice, int lane) {
  if (S == 1)
    return;
  __syncthreads();
  if (slice > 0)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        red[(((slice - 1) * TILES + tile) * NB * 4 + nb * 4 + i) * 32 + lane] = acc[nb][i];
  __syncthreads();
  if (slice == 0)
    for (int sl = 1; sl < S; ++sl)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          acc[nb][i] += red[(((sl - 1) * TILES + tile) * NB * 4 + nb * 4 + i) * 32 + lane];
}

// Packs the activation rows of each chunk's pairs (row = order[...] / div: div = topk for
// token rows, 1 for pair rows) for the mma kernels; slots past a chunk's count repeat its
// last pair. Without `chunks` (a dense matmul), chunk c is rows c·NT .. of `rows`.
// Grid (chunks, k / 256), 256 threads.
template <int NB>
__global__ void __launch_bounds__(256)
    moe_pack_kernel(Act src, const int *__restrict__ order, const int4 *__restrict__ chunks,
                    int div, int rows, int k, int8_t *__restrict__ pq, float4 *__restrict__ pf) {
  pdl_enter();
  constexpr int NT = 8 * NB;
  const int c = blockIdx.x, blk = blockIdx.y;
  const int4 ch = chunks ? chunks[c] : make_int4(0, c * NT, min(NT, rows - c * NT), 0);
  if (ch.z == 0)
    return;
  auto row_of = [&](int slot) -> size_t {
    const int i = ch.y + min(slot, ch.z - 1);
    return chunks ? order[i] / div : i;
  };
  for (int i = threadIdx.x; i < NT * 16; i += blockDim.x) {
    const int slot = i / 16, part = i % 16;
    const size_t row = row_of(slot);
    const uint4 v = *reinterpret_cast<const uint4 *>(src.q + row * k + blk * QK + part * 16);
    const size_t j = (size_t)c * (k / Q8) + blk * 8 + part / 2;
    *reinterpret_cast<uint4 *>(pq + (j * NB + slot / 8) * 256 + (slot % 8) * 32 +
                               (part % 2) * 16) = v;
  }
  for (int i = threadIdx.x; i < NT * 4; i += blockDim.x) {
    const int slot = i / 4, gi = i % 4;
    const size_t row = row_of(slot);
    const int j0 = blk * 8 + 2 * gi;
    const float *d = src.d + row * (k / Q8) + j0, *s = src.s + row * (k / 16) + 2 * j0;
    pf[(((size_t)c * (k / 64) + blk * 4 + gi) * NB + slot / 8) * 8 + slot % 8] =
        make_float4(d[0], d[1], s[0] + s[1], s[2] + s[3]);
  }
}

// w1‖w3 for a chunk of up to 8·NB pairs routed to one expert, tensor cores: a block is 32
// rows, four 16-row tiles (two of w1, two of w3, a warp each) × S warps splitting K;
// act = silu(x·w1)·(x·w3) quantized per pair row (one 32-row group per block).
template <int NB, int S>
__global__ void __launch_bounds__(4 * S * 32)
    moe_w13_mma_kernel(const uint8_t *__restrict__ w1, const uint8_t *__restrict__ w3,
                       const int *__restrict__ order, const int4 *__restrict__ chunks,
                       int topk, Packed x, int n, int k, Act act_out) {
  pdl_enter();
  constexpr int NT = 8 * NB;
  __shared__ int pair[NT], token[NT];
  __shared__ float out[2][NT][32]; // [w1 / w3][pair][row]
  __shared__ float red[S > 1 ? (S - 1) * 4 * NB * 4 * 32 : 1];
  const int4 c = load_chunk<NT>(chunks, order, topk, pair, token);
  const int count = c.z;
  if (count == 0)
    return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int tile = warp & 3, slice = warp >> 2, m = tile & 1, half_ = tile >> 1;
  const int nbk = k / QK;
  const size_t row_bytes = (size_t)nbk * QB;
  const uint8_t *w = (m ? w3 : w1) + ((size_t)c.x * n + blockIdx.x * 32 + half_ * 16 + gq) * row_bytes;
  float acc[NB][4] = {};
  for (int blk = slice; blk < nbk; blk += S)
    tile_mma<NB>(load_tile(w, w + 8 * row_bytes, blk, tq), x, k, blockIdx.y, blk, gq, tq, acc);
  reduce_slices<NB, S, 4>(acc, red, tile, slice, lane);
  if (slice == 0)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = nb * 8 + 2 * tq + (i & 1);
        if (t < count)
          out[m][t][half_ * 16 + gq + 8 * (i >> 1)] = acc[nb][i];
      }
  __syncthreads();
  for (int t = warp; t < count; t += 4 * S) {
    const float gs = out[0][t][lane];
    quantize_group(gs / (1.0f + __expf(-gs)) * out[1][t][lane], lane, act_out,
                   (size_t)pair[t] * n + blockIdx.x * 32);
  }
}

// w2 for a chunk of up to 8·NB pairs, tensor cores: a block is one 16-row tile × S warps
// splitting K; y[pair, row] in f32.
template <int NB, int S>
__global__ void __launch_bounds__(S * 32)
    moe_w2_mma_kernel(const uint8_t *__restrict__ w2, const int *__restrict__ order,
                      const int4 *__restrict__ chunks, int topk, Packed x, int n, int k,
                      float *__restrict__ y) {
  pdl_enter();
  constexpr int NT = 8 * NB;
  __shared__ int pair[NT], token[NT];
  __shared__ float red[S > 1 ? (S - 1) * NB * 4 * 32 : 1];
  const int4 c = load_chunk<NT>(chunks, order, topk, pair, token);
  const int count = c.z;
  if (count == 0)
    return;
  const int slice = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int nbk = k / QK;
  const size_t row_bytes = (size_t)nbk * QB;
  const size_t base = ((size_t)c.x * n + row0 + gq) * row_bytes;
  float acc[NB][4] = {};
  for (int blk = slice; blk < nbk; blk += S)
    tile_mma<NB>(load_tile(w2 + base, w2 + base + 8 * row_bytes, blk, tq), x, k, blockIdx.y,
                 blk, gq, tq, acc);
  reduce_slices<NB, S, 1>(acc, red, 0, slice, lane);
  if (slice == 0)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = nb * 8 + 2 * tq + (i & 1), r = row0 + gq + 8 * (i >> 1);
        if (t < count)
          y[(size_t)pair[t] * n + r] = acc[nb][i];
      }
}

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

// GPT-NeoX rotation of the pair (a, b) by the position's (c, s), in T's own arithmetic as
// candle's rope computes it.
template <typename T>
__device__ __forceinline__ void neox_rotate(T a, T b, T c, T s, T &r1, T &r2) {
  r1 = a * c - b * s;
  r2 = a * s + b * c;
}

// Paged attention's cache layouts: element j of KV head `head` of the token at offset `off` of
// cache block `blk` — key [blocks, kvh, d/x, block_size, x] (x values of 16 bytes), value
// [blocks, kvh, d, block_size].
__device__ __forceinline__ long long key_cache_at(long long blk, int head, int kvh, int d, int x,
                                                  int j, int block_size, long long off) {
  return (((blk * kvh + head) * (d / x) + j / x) * block_size + off) * x + j % x;
}
__device__ __forceinline__ long long value_cache_at(long long blk, int head, int kvh, int d, int j,
                                                    int block_size, long long off) {
  return ((blk * kvh + head) * d + j) * block_size + off;
}

// One decode token's attention inputs, one launch instead of three (candle's rope for q and
// for k, paged attention's reshape_and_cache): q and k rotated in place of candle's `rope`
// (GPT-NeoX halves: x1·c − x2·s, x1·s + x2·c, in T's own arithmetic as candle computes it),
// then k and v written to the paged cache at `slot` as reshape_and_cache does (key cache
// [blocks, kv_heads, d/X, block_size, X] with X = 16 bytes of T, value cache [blocks, kv_heads,
// d, block_size]). q: [qh·d], k, v: [kvh·d]; cos, sin: the position's rows [d/2].
template <typename T>
__global__ void __launch_bounds__(1024)
    rope_cache_kernel(T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                      const T *__restrict__ cos, const T *__restrict__ sin, int qh, int kvh,
                      int d, const long long *__restrict__ slot_mapping, int block_size,
                      T *__restrict__ key_cache, T *__restrict__ value_cache) {
  pdl_enter();
  const int half_d = d / 2, x = 16 / (int)sizeof(T);
  const int q_pairs = qh * half_d, k_pairs = kvh * half_d, v_vals = kvh * d;
  const long long slot = slot_mapping[0];
  const long long blk = slot / block_size, off = slot % block_size;
  for (int i = threadIdx.x; i < q_pairs + k_pairs + v_vals; i += blockDim.x) {
    if (i < q_pairs + k_pairs) {
      const bool is_q = i < q_pairs;
      const int p = is_q ? i : i - q_pairs;
      const int head = p / half_d, j = p % half_d;
      const T *src = is_q ? q : k;
      const int i1 = head * d + j, i2 = i1 + half_d;
      T r1, r2;
      neox_rotate(src[i1], src[i2], cos[j], sin[j], r1, r2);
      if (is_q) {
        q[i1] = r1;
        q[i2] = r2;
      } else if (slot >= 0) {
        key_cache[key_cache_at(blk, head, kvh, d, x, j, block_size, off)] = r1;
        key_cache[key_cache_at(blk, head, kvh, d, x, j + half_d, block_size, off)] = r2;
      }
    } else if (slot >= 0) {
      const int t = i - q_pairs - k_pairs, head = t / d, j = t % d;
      value_cache[value_cache_at(blk, head, kvh, d, j, block_size, off)] = v[t];
    }
  }
}

// Decode attention of one sequence's one token over its paged KV cache, split over the
// context ("flash decoding"): block (kv head h, partition p) takes ATT_PART tokens, computes
// the scores of the G query heads that share h, their softmax max and sum, and the weighted
// sum of V; attn_combine_kernel merges the partitions per query head. Paged attention v1 runs
// one block per query head over the whole context (32 blocks for Mixtral on 132 SMs); here
// a 640-token context is 8 × 10 blocks. Caches as paged attention lays them out (key
// [blocks, kvh, D/X, block_size, X], X = 16 bytes of T; value [blocks, kvh, D, block_size];
// block_size a multiple of X, so X consecutive tokens share a cache block);
// block_table: the sequence's u32 cache blocks. part: [kvh, P, G, D + 2] f32 (acc, max, sum).
//
// With `cos` (else q is already rotated and the token's k/v already cached): q, k_new and
// v_new are the projections before rotary embedding. Each block rotates its G query heads as
// rope_cache_kernel does (NeoX halves, T arithmetic per operation), and the last partition's
// block, the one that reads this token, first writes head h's rotated k and its v into the
// cache at slot_mapping[0] (rope_cache_kernel's launch and its round trip saved).
// Every load of a phase is issued before the first is used (one round trip per phase).
constexpr int ATT_D = 128, ATT_PART = 64, ATT_THREADS = 128;

template <typename T, int G>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_partial_kernel(const T *__restrict__ q, const T *__restrict__ k_new,
                        const T *__restrict__ v_new, const T *__restrict__ cos,
                        const T *__restrict__ sin, const long long *__restrict__ slot_mapping,
                        T *key_cache, T *value_cache, const uint32_t *__restrict__ block_table,
                        int ctx, int block_size, int kvh, float scale, float *__restrict__ part) {
  pdl_enter();
  constexpr int X = 16 / sizeof(T), HALF = ATT_D / 2;
  constexpr int PER_PASS = 2 * ATT_THREADS / 32, PASSES = ATT_PART / PER_PASS;
  constexpr int CHUNKS = ATT_PART / X; // X-token runs of a partition
  __shared__ float qs[G][ATT_D];
  __shared__ float sc[G][ATT_PART];
  __shared__ float stat[G][2];
  __shared__ uint32_t cblk[CHUNKS]; // cache block of each X-token run
  const int h = blockIdx.x, p = blockIdx.y, P = gridDim.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31;
  const int t0 = p * ATT_PART, n = min(ATT_PART, ctx - t0);
  if (tid < CHUNKS && tid * X < n)
    cblk[tid] = block_table[(t0 + tid * X) / block_size];
  const T *qh = q + (size_t)h * G * ATT_D;
  if (cos != nullptr) {
    for (int i = tid; i < G * HALF; i += ATT_THREADS) {
      const int g = i / HALF, j = i % HALF;
      T r1, r2;
      neox_rotate(qh[g * ATT_D + j], qh[g * ATT_D + j + HALF], cos[j], sin[j], r1, r2);
      qs[g][j] = to_float(r1);
      qs[g][j + HALF] = to_float(r2);
    }
    const long long slot = slot_mapping[0];
    if (p == P - 1 && slot >= 0) {
      const long long blk = slot / block_size, off = slot % block_size;
      for (int j = tid; j < HALF; j += ATT_THREADS) {
        T r1, r2;
        neox_rotate(k_new[h * ATT_D + j], k_new[h * ATT_D + j + HALF], cos[j], sin[j], r1, r2);
        key_cache[key_cache_at(blk, h, kvh, ATT_D, X, j, block_size, off)] = r1;
        key_cache[key_cache_at(blk, h, kvh, ATT_D, X, j + HALF, block_size, off)] = r2;
      }
      for (int j = tid; j < ATT_D; j += ATT_THREADS)
        value_cache[value_cache_at(blk, h, kvh, ATT_D, j, block_size, off)] = v_new[h * ATT_D + j];
    }
  } else {
    for (int i = tid; i < G * ATT_D; i += ATT_THREADS)
      qs[i / ATT_D][i % ATT_D] = to_float(qh[i]);
  }
  __syncthreads(); // qs, cblk and this token's cache entries visible to the block
  // Scores: half a warp per token, a lane per X-value chunk of the head (one 16-byte load),
  // PER_PASS tokens a pass; the passes' loads first.
  const int c = lane & 15, tb = warp * 2 + (lane >> 4);
  uint4 raw[PASSES];
#pragma unroll
  for (int u = 0; u < PASSES; ++u) {
    const int tt = tb + PER_PASS * u;
    if (tt < n) {
      raw[u] = *reinterpret_cast<const uint4 *>(
          key_cache + key_cache_at(cblk[tt / X], h, kvh, ATT_D, X, c * X, block_size,
                                   (t0 + tt) % block_size));
    }
  }
#pragma unroll
  for (int u = 0; u < PASSES; ++u) {
    const int tt = tb + PER_PASS * u;
    float dot[G];
#pragma unroll
    for (int g = 0; g < G; ++g)
      dot[g] = 0.f;
    if (tt < n) {
      const T *kv = reinterpret_cast<const T *>(&raw[u]);
#pragma unroll
      for (int j = 0; j < X; ++j) {
        const float kf = to_float(kv[j]);
#pragma unroll
        for (int g = 0; g < G; ++g)
          dot[g] += qs[g][c * X + j] * kf;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int o = 8; o > 0; o >>= 1)
        dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
    }
    if (c == 0 && tt < n) {
#pragma unroll
      for (int g = 0; g < G; ++g)
        sc[g][tt] = dot[g] * scale;
    }
  }
  __syncthreads();
  // Softmax statistics per query head: the partition's max, exp(s - max), their sum.
  for (int g = warp; g < G; g += ATT_THREADS / 32) {
    float m = -INFINITY;
    for (int tt = lane; tt < n; tt += 32)
      m = fmaxf(m, sc[g][tt]);
    m = warp_max(m);
    float l = 0.f;
    for (int tt = lane; tt < n; tt += 32) {
      const float e = __expf(sc[g][tt] - m);
      sc[g][tt] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stat[g][0] = m;
      stat[g][1] = l;
    }
  }
  // Weighted values: a thread per dimension, the partition's tokens in order; its X-token runs
  // are one 16-byte load each, all issued before the (shared-memory) weights are needed.
  const int d = tid;
  uint4 vraw[CHUNKS];
#pragma unroll
  for (int u = 0; u < CHUNKS; ++u)
    if (u * X < n)
      vraw[u] = *reinterpret_cast<const uint4 *>(
          value_cache +
          value_cache_at(cblk[u], h, kvh, ATT_D, d, block_size, (t0 + u * X) % block_size));
  __syncthreads();
  float acc[G];
#pragma unroll
  for (int g = 0; g < G; ++g)
    acc[g] = 0.f;
#pragma unroll
  for (int u = 0; u < CHUNKS; ++u) {
    const T *vv = reinterpret_cast<const T *>(&vraw[u]);
#pragma unroll
    for (int j = 0; j < X; ++j) {
      const int tt = u * X + j;
      if (tt < n) {
        const float v = to_float(vv[j]);
#pragma unroll
        for (int g = 0; g < G; ++g)
          acc[g] += sc[g][tt] * v;
      }
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float *o = part + (((size_t)h * P + p) * G + g) * (ATT_D + 2);
    o[d] = acc[g];
    if (d == 0) {
      o[ATT_D] = stat[g][0];
      o[ATT_D + 1] = stat[g][1];
    }
  }
}

// Merges attn_partial_kernel's partitions: block = query head, thread = dimension.
template <typename T, int G>
__global__ void __launch_bounds__(ATT_D)
    attn_combine_kernel(const float *__restrict__ part, int P, T *__restrict__ out, Act qout) {
  pdl_enter();
  const int qhd = blockIdx.x, h = qhd / G, g = qhd % G, d = threadIdx.x;
  const float *base = part + ((size_t)h * P * G + g) * (ATT_D + 2);
  const size_t stride = (size_t)G * (ATT_D + 2);
  float m = -INFINITY;
  for (int p = 0; p < P; ++p)
    m = fmaxf(m, base[p * stride + ATT_D]);
  float l = 0.f, o = 0.f;
  for (int p = 0; p < P; ++p) {
    const float *b = base + p * stride;
    const float w = __expf(b[ATT_D] - m);
    l += b[ATT_D + 1] * w;
    o += b[d] * w;
  }
  const T y = from_float<T>(o / l);
  out[(size_t)qhd * ATT_D + d] = y;
  // The output row quantized for o_proj as quantize_kernel would quantize `out` (a warp's 32
  // dimensions are one group).
  if (qout.q != nullptr)
    quantize_group(to_float(y), d & 31, qout, (size_t)qhd * ATT_D + (d & ~31));
}

} // namespace zq

// dtype codes: 0 = f32, 1 = bf16, 2 = f16; for the mat-vec also 3 / 4 = f32 rounded
// through bf16 / f16. Activations: q [rows, k] int8, d [rows, k/32] f32, s [rows, k/16] f32.

// Programmatic dependent launch for every launcher below: on when `on` != 0 and the current
// device is Hopper or later (compute capability >= 9.0); returns whether it is on.
extern "C" int zopilot_set_pdl(int on) {
  int dev = 0, major = 0;
  if (on && cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess)
    zq::g_pdl = major >= 9;
  else
    zq::g_pdl = 0;
  return zq::g_pdl;
}

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

// src: `nblocks` Q4_K blocks; dst: nblocks * 256 f16 values.
extern "C" int zopilot_q4k_dequant_f16(const void *src, void *dst,
                                       long long nblocks, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = nblocks * 8;
  zq::launch(zq::dequant_q4k_f16_kernel, (unsigned)((threads + 255) / 256), 256, 0, st,
      static_cast<const uint8_t *>(src), static_cast<half *>(dst), nblocks);
  return (int)cudaGetLastError();
}

// ---- Grouped MoE decode: plan, pack, w1‖w3, pack, w2, combine. ids: [pairs] u32
// (token-major, `topk` per token). order: [pairs] i32 and chunks: [max_chunks] int4
// (max_chunks ≥ pairs / nt + min(experts, pairs)) are written by zopilot_moe_plan and read by
// the others. nt (pairs per chunk): 8 or 16.

extern "C" int zopilot_moe_plan(const uint32_t *ids, int pairs, int experts, int nt,
                                int max_chunks, int *order, void *chunks, long long stream) {
  if (pairs < 1 || pairs > 4096 || experts < 1 || experts > 256 || nt < 1)
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  zq::launch(zq::moe_plan_kernel, 1, 1024, 0, st, ids, pairs, experts, nt, max_chunks, order,
                                          static_cast<int4 *>(chunks));
  return (int)cudaGetLastError();
}

// y: [tokens * topk, n] f32; topw: [tokens, topk]; resid (nullable), out: [tokens, n] in
// `dtype` (0 f32, 1 bf16, 2 f16).
extern "C" int zopilot_moe_combine(const float *y, const float *topw, int tokens, int topk,
                                   int n, const void *resid, void *out, int dtype,
                                   long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid((n + 255) / 256, tokens);
  switch (dtype) {
#define ZQ_CMB(CODE, T)                                                        \
  case CODE:                                                                   \
    zq::launch(zq::moe_combine_kernel<T>, grid, 256, 0, st,                            \
        y, topw, topk, n, static_cast<const T *>(resid), static_cast<T *>(out)); \
    break;
    ZQ_CMB(0, float)
    ZQ_CMB(1, __nv_bfloat16)
    ZQ_CMB(2, half)
#undef ZQ_CMB
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// Packed activations: pq [max_chunks * nt * k] int8 and pf [max_chunks * nt * k / 64]
// float4, written by zopilot_moe_pack from quantized rows (div = topk when the rows are
// tokens, 1 when pairs). n % 32 == 0 (w1‖w3), n % 16 == 0 (w2). ZQ_S13 / ZQ_S2: warps
// splitting K per tile (compile-time; scripts/q4k-kernel-bench.cu builds variants).
#ifndef ZQ_S13
#define ZQ_S13 2
#endif
#ifndef ZQ_S2
#define ZQ_S2 8
#endif
extern "C" int zopilot_moe_pack(const int8_t *q, const float *d, const float *s,
                                const int *order, const void *chunks, int max_chunks, int nt,
                                int div, int k, int8_t *pq, void *pf, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(max_chunks, k / zq::QK);
  const int4 *c = static_cast<const int4 *>(chunks);
  float4 *f = static_cast<float4 *>(pf);
  switch (nt) {
  case 8:
    zq::launch(zq::moe_pack_kernel<1>, grid, 256, 0, st, act(q, d, s), order, c, div, 0, k, pq, f);
    break;
  case 16:
    zq::launch(zq::moe_pack_kernel<2>, grid, 256, 0, st, act(q, d, s), order, c, div, 0, k, pq, f);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

extern "C" int zopilot_moe_w13_mma(const void *w1, const void *w3, const int *order,
                                   const void *chunks, int max_chunks, int nt, int topk,
                                   const int8_t *pq, const void *pf, int n, int k, int8_t *aq,
                                   float *ad, float *as, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  constexpr int S = ZQ_S13;
  const dim3 grid(n / 32, max_chunks);
  const uint8_t *a = static_cast<const uint8_t *>(w1), *b = static_cast<const uint8_t *>(w3);
  const int4 *c = static_cast<const int4 *>(chunks);
  const zq::Packed x{pq, static_cast<const float4 *>(pf)};
  const zq::Act out = act(aq, ad, as);
  switch (nt) {
  case 8:
    zq::launch(zq::moe_w13_mma_kernel<1, S>, grid, 4 * S * 32, 0, st,
        a, b, order, c, topk, x, n, k, out);
    break;
  case 16:
    zq::launch(zq::moe_w13_mma_kernel<2, S>, grid, 4 * S * 32, 0, st,
        a, b, order, c, topk, x, n, k, out);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

extern "C" int zopilot_moe_w2_mma(const void *w2, const int *order, const void *chunks,
                                  int max_chunks, int nt, int topk, const int8_t *pq,
                                  const void *pf, int n, int k, float *y, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  constexpr int S = ZQ_S2;
  const dim3 grid(n / 16, max_chunks);
  const uint8_t *w = static_cast<const uint8_t *>(w2);
  const int4 *c = static_cast<const int4 *>(chunks);
  const zq::Packed x{pq, static_cast<const float4 *>(pf)};
  switch (nt) {
  case 8:
    zq::launch(zq::moe_w2_mma_kernel<1, S>, grid, S * 32, 0, st, w, order, c, topk, x, n, k, y);
    break;
  case 16:
    zq::launch(zq::moe_w2_mma_kernel<2, S>, grid, S * 32, 0, st, w, order, c, topk, x, n, k, y);
    break;
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

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

// Decode attention inputs of one token (rope_cache_kernel): dtype 1 bf16, 2 f16.
extern "C" int zopilot_rope_cache(void *q, const void *k, const void *v, const void *cos,
                                  const void *sin, int qh, int kvh, int d,
                                  const long long *slot_mapping, int block_size,
                                  void *key_cache, void *value_cache, int dtype,
                                  long long stream) {
  if (d % 2 || d % (16 / 2))
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
#define ZQ_ROPE(CODE, T)                                                       \
  case CODE:                                                                   \
    zq::launch(zq::rope_cache_kernel<T>, 1, 1024, 0, st, static_cast<T *>(q),  \
               static_cast<const T *>(k), static_cast<const T *>(v),           \
               static_cast<const T *>(cos), static_cast<const T *>(sin), qh,   \
               kvh, d, slot_mapping, block_size, static_cast<T *>(key_cache),  \
               static_cast<T *>(value_cache));                                 \
    break;
    ZQ_ROPE(1, __nv_bfloat16)
    ZQ_ROPE(2, half)
#undef ZQ_ROPE
  default:
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// One sequence's decode attention (attn_partial_kernel + attn_combine_kernel): q [qh, 128],
// out [qh, 128], both in `dtype` (1 bf16, 2 f16); part: scratch of kvh · ceil(ctx / 64) ·
// (qh / kvh) · 130 f32. qh / kvh in {1, 2, 4, 8}; block_size a multiple of 8. With cos / sin
// (the position's [64] row each): q is not yet rotated, and k / v ([kvh, 128], not rotated)
// go into the caches at slot_mapping[0] first, as zopilot_rope_cache would put them; without:
// q already rotated, the token already cached (k, v, sin, slot_mapping unused). oq, od, os
// (nullable): the output also quantized (one row of qh · 128) for the o_proj mat-vec.
extern "C" int zopilot_decode_attention(const void *q, const void *k, const void *v,
                                        const void *cos, const void *sin,
                                        const long long *slot_mapping, void *key_cache,
                                        void *value_cache, const uint32_t *block_table,
                                        int ctx, int block_size, int qh, int kvh, float scale,
                                        float *part, void *out, int8_t *oq, float *od,
                                        float *os, int dtype, long long stream) {
  if (ctx < 1 || kvh < 1 || qh % kvh || block_size < 1 || block_size % 8 ||
      (cos != nullptr && (k == nullptr || v == nullptr || sin == nullptr || !slot_mapping)))
    return (int)cudaErrorInvalidValue;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int P = (ctx + zq::ATT_PART - 1) / zq::ATT_PART, G = qh / kvh;
  const dim3 grid(kvh, P);
#define ZQ_ATT(TT, GG)                                                         \
  if (G == GG) {                                                               \
    zq::launch(zq::attn_partial_kernel<TT, GG>, grid, zq::ATT_THREADS, 0, st,   \
               static_cast<const TT *>(q), static_cast<const TT *>(k),          \
               static_cast<const TT *>(v), static_cast<const TT *>(cos),        \
               static_cast<const TT *>(sin), slot_mapping,                     \
               static_cast<TT *>(key_cache), static_cast<TT *>(value_cache),    \
               block_table, ctx, block_size, kvh, scale, part);                \
    zq::launch(zq::attn_combine_kernel<TT, GG>, qh, zq::ATT_D, 0, st,           \
               static_cast<const float *>(part), P, static_cast<TT *>(out),    \
               act(oq, od, os));                                               \
    return (int)cudaGetLastError();                                            \
  }
  if (dtype == 1) {
    ZQ_ATT(__nv_bfloat16, 1) ZQ_ATT(__nv_bfloat16, 2) ZQ_ATT(__nv_bfloat16, 4)
    ZQ_ATT(__nv_bfloat16, 8)
  } else if (dtype == 2) {
    ZQ_ATT(half, 1) ZQ_ATT(half, 2) ZQ_ATT(half, 4) ZQ_ATT(half, 8)
  }
#undef ZQ_ATT
  return (int)cudaErrorInvalidValue;
}

// Profiling (`ZOPILOT_STEP_TRACE_HEAD_US`): one thread spins `us` microseconds on the stream, so
// the host queues the step's kernels ahead of the GPU; forward time minus `us` is then the GPU's
// own time for the step, without the gaps where it waited for the host to launch.
__global__ void zopilot_spin_kernel(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

extern "C" int zopilot_spin(int us, long long stream) {
  zopilot_spin_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      (unsigned long long)us * 1000ull);
  return (int)cudaGetLastError();
}
