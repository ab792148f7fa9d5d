// Shared by every kernel file: the Q4_K and activation layouts, programmatic dependent
// launch, warp reductions, a lane's Q4_K loads and dot products, type conversions and the
// activation quantization every producer of int8 rows ends with.
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
#pragma once

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

extern int g_pdl; // set once by zopilot_set_pdl (launch.cu)

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

// out[i] = the MoE block's output `total`, plus resid[i] when given — each rounded to OUT as
// the unfused add would see them.
template <typename OUT>
__device__ __forceinline__ void store_moe_out(OUT *out, const OUT *resid, size_t i, float total) {
  out[i] = resid ? from_float<OUT>(to_float(resid[i]) + to_float(from_float<OUT>(total)))
                 : from_float<OUT>(total);
}

// The round_via code of a model dtype T (router logits come back in it).
template <typename T> __host__ __device__ constexpr int round_code() {
  return std::is_same<T, __nv_bfloat16>::value ? 1 : (std::is_same<T, half>::value ? 2 : 0);
}

} // namespace zq

// dtype codes: 0 = f32, 1 = bf16, 2 = f16; for the mat-vec also 3 / 4 = f32 rounded
// through bf16 / f16. Activations: q [rows, k] int8, d [rows, k/32] f32, s [rows, k/16] f32.

// Quantized activation rows from a launcher's three pointers.
static inline zq::Act act(const int8_t *q, const float *d, const float *s) {
  return zq::Act{const_cast<int8_t *>(q), const_cast<float *>(d), const_cast<float *>(s)};
}
