//! The decode options: which Mixtral path runs and from how many tokens each of our kernels
//! takes over. Set once per process by whoever loads the model (zopilot-gpu's `Settings`,
//! whose flags and `ZOPILOT_*` variables `--help` lists), before the first forward; read by
//! these wrappers and by the vendored Mixtral layer. A process that sets nothing gets
//! [`DecodeOptions::default`]. Built without the `cuda` feature too: the choice of path
//! exists on every build.

use std::sync::OnceLock;

/// Which implementation of Mixtral's layers runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixtralPath {
    /// Ours: the experts stacked per layer and routed on the device, the Q4K linear layers,
    /// the fused decode layer and attention (on CUDA with Q4K weights; elsewhere the stacked
    /// experts on candle's kernels).
    Ours,
    /// mistral.rs' own Mixtral (a loop over the experts, candle's quantized matmuls): for
    /// comparison, and as a fallback should a kernel of ours misbehave on some GPU.
    Upstream,
}

/// Every decode option; [`Default`] is what ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    pub mixtral_path: MixtralPath,
    /// Programmatic dependent launch of our kernels (Hopper and later): each may start while
    /// the one before it finishes. Off helps a profiler that attributes time per kernel.
    pub pdl: bool,
    /// Most tokens in a forward for which the experts run per (token, expert) pair; more take
    /// the grouped kernels (each expert's weights read once per chunk of its pairs).
    pub moe_gather_max_tokens: usize,
    /// Most tokens for the grouped experts on tensor cores; more (prefill) dequantize each
    /// expert for cuBLAS. 0 turns the tensor-core grouped kernels off.
    pub moe_mma_max_tokens: usize,
    /// From this many tokens (prefill; past `moe_mma_max_tokens`) the experts run as one
    /// GEMM straight from their Q4K blocks on f16 tensor cores, instead of each expert
    /// dequantized to f16 for cuBLAS. 0 turns it off.
    pub moe_gemm_min_tokens: usize,
    /// From this many rows the dense Q4K layers (attention projections, router, lm_head)
    /// multiply on tensor cores instead of the mat-vec. 0 turns that off.
    pub mma_min_tokens: usize,
    /// Most rows the dense Q4K layers take through our kernels (mat-vec, tensor cores); more
    /// go to candle's quantized matmul, unless `dense_cublas_min_tokens` takes them.
    pub mma_max_tokens: usize,
    /// From this many rows the dense Q4K layers dequantize their weight to f16 and multiply
    /// with cuBLAS (prefill), ahead of both our kernels and candle's quantized matmul.
    /// 0 turns that off.
    pub dense_cublas_min_tokens: usize,
    /// One line per engine step on stderr (sequences, host and GPU times): profiling.
    pub step_trace: bool,
    /// With the step trace, the GPU first spins this many µs so that the host queues the
    /// whole forward ahead of it: forward time minus this is the GPU's own time.
    pub step_trace_head_us: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            mixtral_path: MixtralPath::Ours,
            pdl: true,
            moe_gather_max_tokens: 2,
            moe_mma_max_tokens: 64,
            moe_gemm_min_tokens: 0,
            mma_min_tokens: 3,
            mma_max_tokens: 128,
            dense_cublas_min_tokens: 129,
            step_trace: false,
            step_trace_head_us: 0,
        }
    }
}

static OPTIONS: OnceLock<DecodeOptions> = OnceLock::new();

/// Sets the process's options; once only. Setting the same options again is fine; different
/// ones after the first set (or after a read) are refused with the options in force, since
/// the kernels read them once.
pub fn set(options: DecodeOptions) -> Result<(), DecodeOptions> {
    let now = OPTIONS.get_or_init(|| options.clone());
    if *now == options {
        Ok(())
    } else {
        Err(now.clone())
    }
}

/// The options in force: those [`set`] was given, else the defaults (fixed from then on).
pub fn get() -> &'static DecodeOptions {
    OPTIONS.get_or_init(DecodeOptions::default)
}
