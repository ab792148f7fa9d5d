//! zopilot-gpu patch: the hook through which Mixtral's quantized weights are recorded while
//! in-situ quantization makes them, or supplied instead of being made.
//!
//! The appliance's quantized-weights cache (a GGUF file) installs a [`WeightStore`] before
//! loading. On a first load the store is handed every tensor our Mixtral layers quantize
//! ([`WeightStore::put`]); on later loads it supplies them ([`WeightStore::get`]) and neither
//! bf16 weights nor quantization are touched. Names are the Hugging Face checkpoint's
//! (`model.layers.0.self_attn.q_proj.weight`), stacked experts one tensor per projection,
//! `[E, N, K]`, named `model.layers.0.block_sparse_moe.experts.w1` (`w3`, `w2`).
//! mistral.rs' loader API has no way to hand a model constructor an object, hence a
//! process-wide slot; a process loads one model.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{quantized::GgmlDType, Result};

/// A quantized tensor in GGUF's block layout, rows outermost.
pub struct StoredTensor<'a> {
    pub dtype: GgmlDType,
    /// Outermost first, as candle orders them (`[out, in]`, stacked `[E, out, in]`).
    pub dims: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

/// Where quantized weights come from and go while a Mixtral model loads.
pub trait WeightStore: Send + Sync {
    /// Whether this store supplies a tensor called `name` (cheap: no checksum).
    fn contains(&self, name: &str) -> bool;
    /// The stored tensor called `name`, if this store supplies it. An error (a checksum that
    /// does not match, say) fails the load.
    fn get(&self, name: &str) -> Result<Option<StoredTensor<'_>>>;
    /// A tensor just quantized while loading.
    fn put(&self, name: &str, tensor: StoredTensor<'_>) -> Result<()>;
}

static STORE: Mutex<Option<Arc<dyn WeightStore>>> = Mutex::new(None);

/// Installs (or with `None` removes) the store the next model load uses.
pub fn set_store(store: Option<Arc<dyn WeightStore>>) {
    *STORE.lock().unwrap_or_else(|e| e.into_inner()) = store;
}

/// The installed store, if any.
pub(crate) fn store() -> Option<Arc<dyn WeightStore>> {
    STORE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether a store is installed (then every quantization is ours, so it can be recorded).
pub(crate) fn installed() -> bool {
    store().is_some()
}

/// Hands a freshly quantized tensor to the installed store, if any.
pub(crate) fn record(name: &str, dtype: GgmlDType, dims: &[usize], bytes: &[u8]) -> Result<()> {
    match store() {
        Some(store) => store.put(
            name,
            StoredTensor {
                dtype,
                dims: dims.to_vec(),
                bytes: Cow::Borrowed(bytes),
            },
        ),
        None => Ok(()),
    }
}

/// The stored tensor `name` uploaded to `target` as the layer ISQ would have built.
pub(crate) fn load_stored(
    name: &str,
    dims: &[usize],
    target: &candle_core::Device,
) -> Result<Option<(Arc<candle_core::quantized::QTensor>, Arc<dyn mistralrs_quant::QuantMethod>)>> {
    let Some(store) = store() else {
        return Ok(None);
    };
    let Some(t) = store.get(name)? else {
        return Ok(None);
    };
    if t.dims != dims {
        candle_core::bail!("stored weight {name} is {:?}, the model needs {dims:?}", t.dims);
    }
    super::mixtral_stacked_moe::gguf_layer(t.dtype, &t.bytes, t.dims.clone(), target).map(Some)
}
