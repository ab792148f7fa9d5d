// Q4_K → f16 dequantization (the host-routed grouped MoE path's per-expert GEMM input).

#include "common.cuh"

namespace zq {

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

} // namespace zq

// src: `nblocks` Q4_K blocks; dst: nblocks * 256 f16 values.
extern "C" int zopilot_q4k_dequant_f16(const void *src, void *dst,
                                       long long nblocks, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = nblocks * 8;
  zq::launch(zq::dequant_q4k_f16_kernel, (unsigned)((threads + 255) / 256), 256, 0, st,
      static_cast<const uint8_t *>(src), static_cast<half *>(dst), nblocks);
  return (int)cudaGetLastError();
}
