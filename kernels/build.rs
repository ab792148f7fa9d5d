//! Compiles `cuda/*.cu` into one static library with the flags in `nvcc-flags.txt` (the
//! `cuda` feature only). The target GPU comes from `CUDA_COMPUTE_CAP` (cudaforge's rule, as
//! for candle's and mistral.rs' kernels): the build never asks a GPU.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn build() {
        for watched in ["nvcc-flags.txt", "cuda"] {
            println!("cargo:rerun-if-changed={watched}");
        }
        let flags = std::fs::read_to_string("nvcc-flags.txt").expect("kernels/nvcc-flags.txt");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let builder = cudaforge::KernelBuilder::new()
            .source_glob("cuda/*.cu")
            .watch(["cuda/common.cuh", "cuda/mma.cuh", "cuda/route.cuh"])
            .out_dir(&out)
            .args(
                flags
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#')),
            )
            .arg("-Xcompiler")
            .arg("-fPIC");
        if let Some(cap) = builder.get_compute_cap() {
            assert!(
                cap >= 80,
                "zopilot-kernels needs compute capability 8.0 or newer (CUDA_COMPUTE_CAP={cap}): \
                 its kernels use bf16 and int8 tensor-core instructions"
            );
        }
        builder
            .build_lib(out.join("libzopilotkernels.a"))
            .expect("nvcc failed on kernels/cuda (the error is above)");
        println!("cargo:rustc-link-search={}", out.display());
        println!("cargo:rustc-link-lib=zopilotkernels");
        println!("cargo:rustc-link-lib=dylib=cudart");
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}
