# The zopilot-gpu binary, built with crane: dependencies (every CUDA kernel of candle and
# mistral.rs included) are built once by `buildDepsOnly` and reused, so a change to our
# sources does not recompile them. The build never touches a GPU: the target capability is
# given, not detected.
{
  lib,
  craneLib,
  cudaPackages,
  autoAddDriverRunpath,
  symlinkJoin,
  python3,
  rev,
  cudaSupport ? true,
  # "12.0" for the RTX 5090, "9.0" for H100/H200, "8.9" for RTX 4090/L40S, "8.0" for A100.
  cudaCapability ? "12.0",
  # nvcc processes per kernel build script (cudaforge reads CUDAFORGE_THREADS; its default
  # is half the CPUs). Cargo runs several such scripts at once and one nvcc of the larger
  # kernels takes a few GiB, so an unbounded build runs ordinary builders out of memory.
  cudaforgeThreads ? 2,
}:
let
  capDigits = lib.replaceStrings [ "." ] [ "" ] cudaCapability;

  # nvcc and the headers mistral.rs and candle compile against, in one tree (their build
  # scripts look for $CUDA_ROOT/bin/nvcc and include/). Build-time only: no libraries
  # here, so nothing links or RUNPATHs into it; the libraries come from buildInputs.
  cudaRoot = symlinkJoin {
    name = "cuda-build-root-${cudaPackages.cudaMajorMinorVersion}";
    paths = with cudaPackages; [
      (lib.getBin cuda_nvcc)
      (lib.getDev cuda_nvcc)
      (lib.getDev cuda_cudart)
      (lib.getDev cuda_cccl)
      (lib.getDev libcublas)
      (lib.getDev libcurand)
      (lib.getDev cuda_nvrtc)
    ];
  };

  src = lib.cleanSourceWith {
    src = ./..;
    filter =
      path: type:
      (craneLib.filterCargoSources path type)
      # The patched mistralrs-core and our kernel crate whole: their CUDA (and Metal) kernels
      # and nvcc flag list are not Cargo sources.
      || lib.hasInfix "/vendor/mistralrs-core" (toString path)
      || lib.hasInfix "/kernels" (toString path)
      || lib.hasSuffix "libcuda-symbols.txt" path
      || lib.hasSuffix ".py" path;
  };

  # What the CUDA build scripts read; the dev shell sets the same.
  cudaEnv = lib.optionalAttrs cudaSupport {
    CUDA_COMPUTE_CAP = capDigits;
    CUDA_ROOT = "${cudaRoot}";
    CUDA_PATH = "${cudaRoot}";
    CUDA_HOME = "${cudaRoot}";
    CUDAFORGE_THREADS = toString cudaforgeThreads;
  };

  commonArgs = {
    inherit src;
    pname = "zopilot-gpu";
    version = (craneLib.crateNameFromCargoToml { cargoToml = ../Cargo.toml; }).version;
    strictDeps = true;
    cargoExtraArgs = "--locked" + lib.optionalString cudaSupport " --features cuda";
    # No build revision here: buildDepsOnly gets these too, and a variable that changes
    # with every commit would rebuild every CUDA kernel of the dependencies each time.
    env =
      cudaEnv
      // lib.optionalAttrs cudaSupport {
        ZOPILOT_CUDA_VERSION = cudaPackages.cudaMajorMinorVersion;
      };
    nativeBuildInputs = lib.optionals cudaSupport [
      cudaPackages.cuda_nvcc
      autoAddDriverRunpath
    ];
    buildInputs = lib.optionals cudaSupport (
      with cudaPackages;
      [
        cuda_cudart
        cuda_cccl
        libcublas
        libcurand
        cuda_nvrtc
      ]
    );
  };

  cargoArtifacts = craneLib.buildDepsOnly commonArgs;
in
craneLib.buildPackage (
  commonArgs
  // {
    inherit cargoArtifacts;
    # Only the final package carries the revision (`check` and `/health` report it).
    env = commonArgs.env // {
      ZOPILOT_GIT_REV = rev;
    };
    # The tests run in `checks` (CPU build); they spawn servers on loopback.
    doCheck = false;
    postInstall = lib.optionalString cudaSupport ''
      # The libcuda stub found through RUNPATH ($ORIGIN/../lib/zopilot-stubs) when a host
      # has no driver, so the binary still starts and reports (src/preflight/driver.rs).
      # build.rs leaves a copy beside cargo's binaries; the RUNPATH never names the build
      # directory (stdenv's audit-tmpdir hook would refuse it).
      install -Dm755 target/release/zopilot-stubs/libcuda.so.1 $out/lib/zopilot-stubs/libcuda.so.1
    '';
    # Build-only CUDA parts must never reach the runtime closure (or the image).
    disallowedReferences = lib.optionals cudaSupport [
      (lib.getBin cudaPackages.cuda_nvcc)
      cudaRoot
    ];
    passthru = {
      inherit cudaSupport cudaCapability cudaEnv;
      cudaVersion = if cudaSupport then cudaPackages.cudaMajorMinorVersion else null;
      checks = lib.optionalAttrs (!cudaSupport) {
        clippy = craneLib.cargoClippy (
          commonArgs
          // {
            inherit cargoArtifacts;
            cargoClippyExtraArgs = "--all-targets -- --deny warnings";
          }
        );
        fmt = craneLib.cargoFmt { inherit src; };
        tests = craneLib.cargoTest (
          commonArgs
          // {
            inherit cargoArtifacts;
            nativeCheckInputs = [ python3 ];
          }
        );
      };
    };
    meta = {
      description = "Serve Mixtral-8x7B-Instruct quantized in situ to 4 bits on one GPU";
      mainProgram = "zopilot-gpu";
      license = lib.licenses.mit;
      platforms = [ "x86_64-linux" ];
    };
  }
)
