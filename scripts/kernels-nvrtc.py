"""Compiles our CUDA kernels (kernels/cuda/*.cu) with the NVRTC
of a given CUDA release, for the compute capabilities the flake builds, on a machine with
no GPU and no CUDA install. It exists because the flake's CUDA (12.8) has no `nvcc` on PyPI
(NVIDIA's cu12 nvcc wheels carry only ptxas, libnvvm and headers), while NVRTC 12.8 is
there: the same front end and NVVM back end as nvcc 12.8, compiling to a cubin per target.

    python3 scripts/kernels-nvrtc.py [--cuda 12.8] [sm_80 sm_89 sm_90a sm_120a]

NVRTC compiles device code only, so the launchers are compiled as device functions
(-default-device), their runtime calls reduced to taking each kernel's address (which is
what instantiates the template kernels), and the few standard headers the file includes
come from libcu++. The kernels themselves, their `__CUDA_ARCH__` branches, inline PTX and
launch bounds go through 12.8's compiler unchanged; the host side of the launchers is not
compiled here (the CUDA 13.0 nvcc build covers it). The wheels land in
~/.cache/cuda-pypi-nvrtc-<version>."""
import argparse
import ctypes
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels/cuda"
# The flags kernels/nvcc-flags.txt gives nvcc that NVRTC accepts (it has no -O3,
# --expt-relaxed-constexpr or --expt-extended-lambda; with -default-device they matter not).
FLAGS = [
    "-std=c++17",
    "--use_fast_math",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-default-device",
    "-rdc=true",
]
SHIMS = {
    "type_traits": "#pragma once\n#include <cuda/std/type_traits>\nnamespace std { using namespace cuda::std; }\n",
    "utility": "#pragma once\n#include <cuda/std/utility>\nnamespace std { using namespace cuda::std; }\n",
    "stdint.h": "#pragma once\n#include <cuda/std/cstdint>\n"
    + "".join(f"using cuda::std::{t};\n" for t in [
        "int8_t", "uint8_t", "int16_t", "uint16_t", "int32_t", "uint32_t", "int64_t", "uint64_t"]),
    "launch_shim.h": """#pragma once
#define INFINITY __int_as_float(0x7f800000)
template <typename... P, typename... A>
__device__ cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t *, void (*k)(P...), A &&...) {
  (void)k;
  return cudaSuccess;
}
""",
}


def toolkit(version):
    root = pathlib.Path.home() / f".cache/cuda-pypi-nvrtc-{version}"
    if not (root / "nvidia/cuda_nvrtc").is_dir():
        with tempfile.TemporaryDirectory() as work:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_12_x86_64",
                 "-d", work]
                + [f"nvidia-{p}-cu12=={version}.*" for p in ("cuda-nvrtc", "cuda-runtime", "cuda-cccl", "cuda-nvcc")],
                check=True,
            )
            for wheel in pathlib.Path(work).glob("*.whl"):
                subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(root)], check=True)
    return root / "nvidia"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", default="12.8")
    ap.add_argument("archs", nargs="*", default=["sm_80", "sm_89", "sm_90a", "sm_120a"])
    args = ap.parse_args()
    nv = toolkit(args.cuda)
    nvrtc = ctypes.CDLL(str(next((nv / "cuda_nvrtc/lib").glob("libnvrtc.so.*"))))
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value} ({nv.parent})")
    sources = sorted(KERNELS.glob("*.cu"))
    failed = 0
    with tempfile.TemporaryDirectory() as shims:
        for name, text in SHIMS.items():
            pathlib.Path(shims, name).write_text(text)
        includes = [f"-I{shims}", f"-I{KERNELS}"] + [f"-I{nv / p / 'include'}" for p in ("cuda_runtime", "cuda_cccl", "cuda_nvcc")]
        for arch in args.archs:
            total, arch_failed = 0, 0
            for src in sources:
                rc, size, log = compile_one(nvrtc, src, arch, includes)
                total += size
                if rc != 0:
                    arch_failed += 1
                    print(f"{arch} {src.name}: {nvrtc.nvrtcGetErrorString(rc).decode()}")
                    print(log[-6000:])
            print(f"{arch}: {'ok' if not arch_failed else 'FAILED'}, {len(sources)} files, cubins {total} bytes")
            failed += arch_failed
    sys.exit(1 if failed else 0)


def compile_one(nvrtc, src, arch, includes):
    """Compiles one .cu for `arch`: (status, cubin bytes, log)."""
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.read_bytes(), src.name.encode(), 0, None, None) == 0
    opts = [f"-arch={arch}", *FLAGS, *includes, "--pre-include=cuda_runtime.h", "--pre-include=launch_shim.h"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    cubin = ctypes.c_size_t()
    if rc == 0:
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, cubin.value, log.value.decode(errors="replace")


if __name__ == "__main__":
    main()
