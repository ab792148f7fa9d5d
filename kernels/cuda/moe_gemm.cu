// Mixtral's experts at prompt sizes: the grouped GEMM straight from Q4_K blocks, each weight
// tile dequantized to f16 in shared memory once per chunk of pairs, f16 tensor cores.

#include "common.cuh"

namespace zq {

// Tiles. A block multiplies GM weight rows by a chunk of up to BN pairs routed to one expert
// (the plan of moe_grouped.cu), K in steps of GK = one Q4_K group of 64 values (its two
// 32-value sub-blocks: the low and the high nibbles of 32 bytes). 8 warps: 4 along the rows ×
// 2 along the pairs, a warp 32 rows × BN/2 pairs of m16n8k16 f16 mma with f32 accumulators.
// Per step the block dequantizes its GM × 64 weight values into shared memory (ggml's
// dequantize_row_q4_K arithmetic, rounded to f16 — the same values the dequantize kernel
// writes for cuBLAS) and stages its pairs' 64 activations each as f16; the next step's global
// loads are issued before this step's mma. Rows in shared memory are GK + 8 halves apart, so
// each ldmatrix phase touches 8 distinct 16-byte bank groups. (Two stages of tiles, filled
// while the other is multiplied, measured slower on an H100: w1‖w3 at 512 tokens 1,789
// against 1,449 µs, kernel bench.)
constexpr int GM = 128, GK = 64, GLD = GK + 8, GTHREADS = 256;

__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const half *p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ uint32_t h2_bits(half2 h) { return *reinterpret_cast<uint32_t *>(&h); }

// 8 activation values (16 bytes of T) → 8 f16 values.
template <typename T> __device__ __forceinline__ uint4 to_f16x8(uint4 v);
template <> __device__ __forceinline__ uint4 to_f16x8<half>(uint4 v) { return v; }
template <> __device__ __forceinline__ uint4 to_f16x8<__nv_bfloat16>(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&w[i]));
    o[i] = h2_bits(__floats2half2_rn(f.x, f.y));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// One thread's share of a step's global loads: a weight row's block header and 16 nibble
// bytes, and its pairs' activation pieces (BN/32 pieces of 8 values).
template <int BN> struct StepLoads {
  uint4 hd, q;
  uint4 x[BN / 32];
};

// The expert GEMM: out rows `first_row ..` of W (TWO: w1 and w3 rows side by side, GM/2 of
// each, combined as silu(x·w1)·(x·w3) into f16 `out[pair, n]`; else f32 `out[pair, n]`).
// `x`: activation rows of T (row of a pair = pair / div), K values each, `ldx` apart.
template <int BN, bool TWO, typename T>
__global__ void __launch_bounds__(GTHREADS)
    moe_gemm_kernel(const uint8_t *__restrict__ wa, const uint8_t *__restrict__ wb,
                    const int *__restrict__ order, const int4 *__restrict__ chunks, int div,
                    const T *__restrict__ x, int n, int k, void *__restrict__ out) {
  pdl_enter();
  constexpr int WN = BN / 2, NT = WN / 8; // pairs per warp, n-tiles per warp
  __shared__ __align__(16) half tiles[(GM + BN) * GLD]; // weights, then activations
  __shared__ int pair[BN];
  const int4 c = chunks[blockIdx.x];
  if (c.z == 0)
    return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31;
  const int wr = warp & 3, wc = warp >> 2;
  const int row_tile = TWO ? GM / 2 : GM;
  const int r0 = blockIdx.y * row_tile;
  if (tid < BN)
    pair[tid] = tid < c.z ? order[c.y + tid] : -1;
  __syncthreads();

  // This thread's weight row (the dequantizing role) and activation pieces.
  const int lrow = tid >> 1, lh = tid & 1;
  const size_t row_bytes = (size_t)(k / QK) * QB;
  const uint8_t *wrow;
  if (TWO)
    wrow = (lrow < GM / 2 ? wa : wb) + ((size_t)c.x * n + r0 + (lrow & (GM / 2 - 1))) * row_bytes;
  else
    wrow = wa + ((size_t)c.x * n + r0 + lrow) * row_bytes;
  const T *xrow[BN / 32];
  int xpart[BN / 32];
#pragma unroll
  for (int i = 0; i < BN / 32; ++i) {
    const int piece = tid + GTHREADS * i, slot = piece >> 3;
    xpart[i] = piece & 7;
    const int p = pair[slot];
    xrow[i] = p < 0 ? nullptr : x + (size_t)(p / div) * k;
  }
  const int steps = k / GK;
  auto load = [&](int s, StepLoads<BN> &l) {
    const int blk = s >> 2, g = s & 3;
    const uint8_t *b = wrow + (size_t)blk * QB;
    l.hd = __ldcs(reinterpret_cast<const uint4 *>(b));
    l.q = __ldcs(reinterpret_cast<const uint4 *>(b + 16 + 32 * g + 16 * lh));
#pragma unroll
    for (int i = 0; i < BN / 32; ++i)
      l.x[i] = xrow[i] ? __ldg(reinterpret_cast<const uint4 *>(xrow[i] + s * GK + 8 * xpart[i]))
                       : make_uint4(0, 0, 0, 0);
  };
  auto store = [&](int s, const StepLoads<BN> &l, half *stage) {
    const ScaleMin sm = scale_min(l.hd, s & 3);
    const float2 dm = __half22float2(*reinterpret_cast<const half2 *>(&l.hd.x));
    const float d0 = dm.x * sm.sc0, n0 = dm.y * sm.m0, d1 = dm.x * sm.sc1, n1 = dm.y * sm.m1;
    const uint32_t q[4] = {l.q.x, l.q.y, l.q.z, l.q.w};
    uint32_t lo[8], hi[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t b0 = (q[j / 2] >> (16 * (j % 2))) & 0xFF;
      const uint32_t b1 = (q[j / 2] >> (16 * (j % 2) + 8)) & 0xFF;
      lo[j] = h2_bits(__floats2half2_rn(d0 * (float)(b0 & 0xF) - n0, d0 * (float)(b1 & 0xF) - n0));
      hi[j] = h2_bits(__floats2half2_rn(d1 * (float)(b0 >> 4) - n1, d1 * (float)(b1 >> 4) - n1));
    }
    uint4 *wl = reinterpret_cast<uint4 *>(stage + lrow * GLD + 16 * lh);
    uint4 *wh = reinterpret_cast<uint4 *>(stage + lrow * GLD + 32 + 16 * lh);
    wl[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    wl[1] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
    wh[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    wh[1] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
#pragma unroll
    for (int i = 0; i < BN / 32; ++i) {
      const int piece = tid + GTHREADS * i;
      *reinterpret_cast<uint4 *>(stage + GM * GLD + (piece >> 3) * GLD + 8 * xpart[i]) =
          to_f16x8<T>(l.x[i]);
    }
  };

  float acc[2][NT][4] = {};
  StepLoads<BN> next;
  load(0, next);
  const half *ws = tiles, *xs = tiles + GM * GLD;
  for (int s = 0; s < steps; ++s) {
    __syncthreads(); // the previous step's mma are done with the tiles
    store(s, next, tiles);
    __syncthreads();
    if (s + 1 < steps)
      load(s + 1, next);
#pragma unroll
    for (int kk = 0; kk < GK; kk += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(a[mt], ws + (wr * 32 + mt * 16 + (lane & 15)) * GLD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, xs + (wc * WN + nt * 8 + (lane & 7) + ((lane >> 4) << 3)) * GLD + kk +
                           ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_f16(acc[mt][nt], a[mt], b[0], b[1]);
          mma_f16(acc[mt][nt + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // Every accumulator with its pair slot and its row in the block's tile.
  const int gq = lane >> 2, tq = lane & 3;
  auto each = [&](auto f) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          f(wc * WN + nt * 8 + 2 * tq + (i & 1), wr * 32 + mt * 16 + gq + 8 * (i >> 1),
            acc[mt][nt][i]);
  };
  if (!TWO) {
    float *o = static_cast<float *>(out);
    each([&](int slot, int row, float v) {
      if (pair[slot] >= 0)
        o[(size_t)pair[slot] * n + r0 + row] = v;
    });
    return;
  }
  // w3's half (warps 2, 3 along the rows: tile rows 64..127) hands its accumulators to w1's
  // through shared memory (the tiles are free once every warp is past its last mma), then
  // w1's warps write silu(w1)·w3.
  __syncthreads();
  float *w3s = reinterpret_cast<float *>(tiles); // [GM/2 rows][BN] f32
  static_assert(GM / 2 * BN * 4 <= (GM + BN) * GLD * 2, "w3 exchange fits the tiles");
  if (wr >= 2)
    each([&](int slot, int row, float v) { w3s[(row - GM / 2) * BN + slot] = v; });
  __syncthreads();
  if (wr < 2) {
    half *o = static_cast<half *>(out);
    each([&](int slot, int row, float g) {
      if (pair[slot] >= 0)
        o[(size_t)pair[slot] * n + r0 + row] =
            __float2half_rn(g / (1.0f + __expf(-g)) * w3s[row * BN + slot]);
    });
  }
}

} // namespace zq

// ---- Grouped experts at prompt sizes, from the plan of zopilot_moe_plan with nt = bn (64 or
// 128). zopilot_moe_gemm_w13: x [tokens, k] (xdtype 1 bf16, 2 f16; row of a pair = pair /
// topk), w1, w3 [E, n, k] Q4_K → act [pairs, n] f16 = silu(x·w1)·(x·w3); n % 64 == 0.
// zopilot_moe_gemm_w2: act [pairs, k] f16, w2 [E, n, k] Q4_K → y [pairs, n] f32 (then
// zopilot_moe_combine); n % 128 == 0. k % 256 == 0 for both.
template <int BN, bool TWO, typename T>
static int launch_moe_gemm(int max_chunks, cudaStream_t st, const void *wa, const void *wb,
                            const int *order, const void *chunks, int div, const void *x,
                            int n, int k, void *out) {
  const dim3 grid(max_chunks, n / (TWO ? zq::GM / 2 : zq::GM));
  zq::launch(zq::moe_gemm_kernel<BN, TWO, T>, grid, zq::GTHREADS, 0, st,
      static_cast<const uint8_t *>(wa), static_cast<const uint8_t *>(wb), order,
      static_cast<const int4 *>(chunks), div, static_cast<const T *>(x), n, k, out);
  return (int)cudaGetLastError();
}

extern "C" int zopilot_moe_gemm_w13(const void *w1, const void *w3, const int *order,
                                    const void *chunks, int max_chunks, int bn, int topk,
                                    const void *x, int xdtype, int n, int k, void *act,
                                    long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (n % (zq::GM / 2) != 0 || k % zq::QK != 0)
    return (int)cudaErrorInvalidValue;
#define ZQ_W13(BN, T)                                                                      \
  launch_moe_gemm<BN, true, T>(max_chunks, st, w1, w3, order, chunks, topk, x, n, k, act)
  if (bn == 64 && xdtype == 1)
    return ZQ_W13(64, __nv_bfloat16);
  if (bn == 64 && xdtype == 2)
    return ZQ_W13(64, half);
  if (bn == 128 && xdtype == 1)
    return ZQ_W13(128, __nv_bfloat16);
  if (bn == 128 && xdtype == 2)
    return ZQ_W13(128, half);
#undef ZQ_W13
  return (int)cudaErrorInvalidValue;
}

extern "C" int zopilot_moe_gemm_w2(const void *w2, const int *order, const void *chunks,
                                   int max_chunks, int bn, const void *act, int n, int k,
                                   float *y, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (n % zq::GM != 0 || k % zq::QK != 0)
    return (int)cudaErrorInvalidValue;
  if (bn == 64)
    return launch_moe_gemm<64, false, half>(max_chunks, st, w2, nullptr, order, chunks, 1, act,
                                            n, k, y);
  if (bn == 128)
    return launch_moe_gemm<128, false, half>(max_chunks, st, w2, nullptr, order, chunks, 1,
                                             act, n, k, y);
  return (int)cudaErrorInvalidValue;
}
