// Mixtral's experts for 3 to a few dozen tokens: (token, expert) pairs grouped by expert
// on the device, each expert's weights read once per chunk of pairs, on tensor cores.

#include "common.cuh"
#include "mma.cuh"

namespace zq {

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

} // namespace zq

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
