// Tensor-core building blocks of the grouped MoE (moe_grouped.cu) and dense matmul
// (matmul.cu) kernels: int8 mma.sync, Q4_K tiles, the packed activation layout and the pack
// kernel that writes it.
#pragma once

#include "common.cuh"

namespace zq {

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

} // namespace zq
