// Launch-wide settings and tools: programmatic dependent launch (on or off for every
// launcher) and the profiling spin kernel.

#include "common.cuh"

namespace zq {
int g_pdl = 0;
} // namespace zq

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
