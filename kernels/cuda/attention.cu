// One decode token's attention: rotary embedding and the paged-cache write in one launch,
// and split-context ("flash decoding") attention over the paged KV cache, optionally
// with the rotation and the cache write fused in.

#include "common.cuh"

namespace zq {

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
