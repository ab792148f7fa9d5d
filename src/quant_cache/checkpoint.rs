//! Reading single unquantized tensors (embedding, norms) from a safetensors checkpoint, one
//! file or shards, converted to the type the GGUF file stores them in.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

/// A checkpoint directory's safetensors files, mapped.
pub struct Checkpoint {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no safetensors in {}", dir.display());
        }
        let maps = files
            .into_iter()
            .map(|p| {
                let f = File::open(&p)?;
                // SAFETY: read-only map of a checkpoint file nobody writes while we load.
                let m = unsafe { memmap2::Mmap::map(&f)? };
                Ok((p, m))
            })
            .collect::<Result<_>>()?;
        Ok(Self { maps })
    }

    /// Tensor `name` as `dtype` (BF16 or F32) little-endian bytes, checked to be `dims`.
    pub fn read(&self, name: &str, dtype: GgmlDType, dims: &[usize]) -> Result<Vec<u8>> {
        for (path, map) in &self.maps {
            let st = SafeTensors::deserialize(map)
                .with_context(|| format!("parsing {}", path.display()))?;
            let Ok(t) = st.tensor(name) else { continue };
            if t.shape() != dims {
                bail!(
                    "{name} is {:?} in {}, expected {dims:?}",
                    t.shape(),
                    path.display()
                );
            }
            let values: Vec<f32> = match t.dtype() {
                Dtype::BF16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => bail!("{name} is {other:?}; expected BF16, F16 or F32"),
            };
            return Ok(match dtype {
                GgmlDType::BF16 if t.dtype() == Dtype::BF16 => t.data().to_vec(),
                GgmlDType::BF16 => values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                GgmlDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                other => bail!("{name}: cannot store as {other:?}"),
            });
        }
        bail!("{name} is in none of the checkpoint's safetensors")
    }
}
