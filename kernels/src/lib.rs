//! zopilot-kernels: our CUDA kernels for Mixtral with Q4K weights (decode, and prefill's
//! dequantization, attention softmax and expert combine), and safe wrappers over them. One file per op
//! family, each launcher beside its kernel in `cuda/`, each wrapper module here named as its
//! `.cu`:
//!
//! | family | kernels (`cuda/`) | wrapper |
//! |---|---|---|
//! | activation quantization to int8 | `quantize.cu` | [`quantize()`] |
//! | RMSNorm + quantization (+ residual, + routing) | `norm.cu` | [`rmsnorm_quantize`] |
//! | mat-vec up to 8 rows, router + top-k | `matvec.cu` | [`matvec_many`], [`router_topk`] |
//! | dense matmul on tensor cores | `matmul.cu` (+ `mma.cuh`) | through [`matvec_many`] from a few rows on |
//! | experts per (token, expert) pair | `moe_pair.cu` | [`moe_w13_silu`], [`moe_w2`] |
//! | experts grouped by expert, tensor cores | `moe_grouped.cu` (+ `mma.cuh`) | [`moe_grouped`] |
//! | experts at prompt sizes, f16 GEMM from Q4_K (opt-in) | `moe_gemm.cu` | [`moe_gemm`] |
//! | host-routed experts' combine (prefill) | `moe_scatter.cu` | [`moe_scatter_add`] |
//! | decode attention over the paged cache | `attention.cu` | [`decode_attention`], [`rope_cache_decode`] |
//! | Q4K → f16 (cuBLAS's input at prefill) | `dequantize.cu` | [`dequant_q4k_f16`] |
//! | prefill attention: scale + mask + softmax | `softmax.cu` | [`masked_softmax`] |
//! | launch settings, profiling spin | `launch.cu` | [`spin`] |
//!
//! `common.cuh` holds the layouts every kernel shares (Q4_K blocks; our int8 activation rows,
//! [`Q8Rows`]); `ffi` the C declarations; `pool` the device buffers and the per-thread scratch
//! pool. [`options`] (every build, CUDA or not) holds the decode options the embedding
//! program sets once at start-up. `build.rs` compiles `cuda/*.cu` with the flags in
//! `nvcc-flags.txt`, the list every other nvcc of these kernels uses too.

pub mod options;

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod dequantize;
#[cfg(feature = "cuda")]
mod ffi;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod matmul;
#[cfg(feature = "cuda")]
mod matvec;
#[cfg(feature = "cuda")]
mod mma;
#[cfg(feature = "cuda")]
mod moe_gemm;
#[cfg(feature = "cuda")]
mod moe_grouped;
#[cfg(feature = "cuda")]
mod moe_pair;
#[cfg(feature = "cuda")]
mod moe_scatter;
#[cfg(feature = "cuda")]
mod norm;
#[cfg(feature = "cuda")]
mod pool;
#[cfg(feature = "cuda")]
mod quantize;
#[cfg(feature = "cuda")]
mod softmax;

#[cfg(feature = "cuda")]
pub use {
    attention::{DecodeRope, decode_attention, rope_cache_decode},
    dequantize::dequant_q4k_f16,
    launch::{q4k_applies, spin},
    matvec::{MATVEC_MAX_TOKENS, matvec_many, router_topk},
    moe_gemm::moe_gemm,
    moe_grouped::{GROUPED_MAX_PAIRS, moe_grouped},
    moe_pair::{moe_w2, moe_w13_silu},
    moe_scatter::moe_scatter_add,
    norm::rmsnorm_quantize,
    pool::Q8Rows,
    quantize::quantize,
    softmax::masked_softmax,
};
