// Q4_K → f16 dequantization: cuBLAS's input at prefill sizes (each expert of the host-routed
// grouped MoE path, the dense layers).

#include "common.cuh"

namespace zq {

// Q4_K blocks → f16 values (ggml's dequantize_row_q4_K arithmetic: d·sc·q − dmin·m in f32),
// a warp per block: lane (g, p) writes values 64g + 8p .. 64g + 8p + 7 (p < 4: the low nibbles
// of 8 bytes of group g; p ≥ 4: their high nibbles), so the warp's 16-byte stores cover the
// block's 512 output bytes in order. (Eight lanes a block, each writing two runs of 16 values
// at 32-byte strides, moved 1.68 TB/s on an H100.)
__global__ void dequant_q4k_f16_kernel(const uint8_t *__restrict__ src,
                                       half *__restrict__ dst, long long nblocks) {
  pdl_enter();
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long blk = t / 32;
  if (blk >= nblocks)
    return;
  const int lane = (int)(t % 32), g = lane >> 3, p = lane & 7, hi = p >> 2;
  const uint8_t *b = src + blk * QB;
  const uint4 hd = __ldcs(reinterpret_cast<const uint4 *>(b));
  const uint2 q = __ldcs(reinterpret_cast<const uint2 *>(b + 16 + 32 * g + 8 * (p & 3)));
  const ScaleMin sm = scale_min(hd, g);
  const float2 dm = __half22float2(*reinterpret_cast<const half2 *>(&hd.x));
  const float d = dm.x * (hi ? sm.sc1 : sm.sc0), m = dm.y * (hi ? sm.m1 : sm.m0);
  const uint32_t w[2] = {hi ? (q.x >> 4) & 0x0F0F0F0Fu : q.x & 0x0F0F0F0Fu,
                         hi ? (q.y >> 4) & 0x0F0F0F0Fu : q.y & 0x0F0F0F0Fu};
  uint32_t o[4]; // two f16 values a word, in memory order
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t v = w[j / 2] >> (16 * (j % 2));
    union {
      half2 h;
      uint32_t u;
    } c;
    c.h = __floats2half2_rn(d * (float)(v & 0xF) - m, d * (float)((v >> 8) & 0xF) - m);
    o[j] = c.u;
  }
  *reinterpret_cast<uint4 *>(dst + blk * QK + 64 * g + 8 * p) = make_uint4(o[0], o[1], o[2], o[3]);
}

} // namespace zq

// src: `nblocks` Q4_K blocks; dst: nblocks * 256 f16 values.
extern "C" int zopilot_q4k_dequant_f16(const void *src, void *dst,
                                       long long nblocks, long long stream) {
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const long long threads = nblocks * 32;
  zq::launch(zq::dequant_q4k_f16_kernel, (unsigned)((threads + 255) / 256), 256, 0, st,
      static_cast<const uint8_t *>(src), static_cast<half *>(dst), nblocks);
  return (int)cudaGetLastError();
}
