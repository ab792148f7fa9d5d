//! Multi-head Latent Attention (MLA) module for efficient decode kernels.
//!
//! This module provides shared infrastructure for MLA-based attention mechanisms
//! used in models like DeepSeek V2/V3 and GLM4 MoE Lite.

mod forward;
mod weights;

pub use forward::{
    mla_cache_forward, mla_decode_forward, should_use_mla_cache, should_use_mla_decode,
};
pub use weights::MlaWeights;

/// Set once an MLA model is built with paged attention (zopilot): only the MLA decode path
/// reads the FlashInfer page tensors (`paged_kv_indptr` and six more), so the decode inputs
/// upload them only when this is set — seven small synchronous copies a step saved for
/// every other model.
pub(crate) static PAGED_DECODE_WANTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the decode inputs must carry FlashInfer's page tensors (zopilot).
pub(crate) fn paged_decode_wanted() -> bool {
    PAGED_DECODE_WANTED.load(std::sync::atomic::Ordering::Relaxed)
}
