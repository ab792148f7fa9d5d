//! Writing GGUF (version 3) files whose tensor table is known before any tensor is: the
//! header is written first, every tensor's bytes then land at their final offset, and the
//! per-tensor checksums — an array in the header of fixed size — are filled in last. So a
//! 26 GB file is written in place, never held in memory or copied. Reading goes through
//! candle's parser (`candle_core::quantized::gguf_file`).

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;

/// GGUF's default and our alignment of tensor data.
pub const ALIGNMENT: u64 = 32;

/// The metadata key of the per-tensor CRC-32 array (in tensor-table order).
pub const CHECKSUMS_KEY: &str = "zopilot.checksums";

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// One tensor of the table: dims outermost first (candle's order; GGUF stores them reversed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        let n: usize = self.dims.iter().product();
        (n / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// GGML's type number of `dtype`.
pub fn type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Where everything of a laid-out file is.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Absolute offset of each tensor's data, in table order.
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    /// Absolute offset of the first checksum (u32 each).
    pub checksums_at: u64,
    /// The file's length.
    pub total: u64,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Writes the header (metadata, then `CHECKSUMS_KEY` with one zero per tensor, then the
/// tensor table) of a file of `tensors` to `path`, sized to its full length. Returns where
/// each tensor goes.
pub fn create(
    path: &Path,
    meta: &[(&str, Meta)],
    tensors: &[TensorSpec],
) -> Result<(File, Layout)> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(&file);
    w.write_all(b"GGUF")?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(meta.len() as u64 + 1).to_le_bytes())?;
    for (key, value) in meta {
        put_str(&mut w, key)?;
        let array = |w: &mut BufWriter<&File>, ty: u32, n: usize| -> std::io::Result<()> {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(n as u64).to_le_bytes())
        };
        match value {
            Meta::U32(v) => {
                w.write_all(&4u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())?;
            }
            Meta::F32(v) => {
                w.write_all(&6u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())?;
            }
            Meta::Bool(v) => {
                w.write_all(&7u32.to_le_bytes())?;
                w.write_all(&[*v as u8])?;
            }
            Meta::Str(s) => {
                w.write_all(&8u32.to_le_bytes())?;
                put_str(&mut w, s)?;
            }
            Meta::Strs(v) => {
                array(&mut w, 8, v.len())?;
                for s in v {
                    put_str(&mut w, s)?;
                }
            }
            Meta::F32s(v) => {
                array(&mut w, 6, v.len())?;
                for x in v {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
            Meta::I32s(v) => {
                array(&mut w, 5, v.len())?;
                for x in v {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
        }
    }
    put_str(&mut w, CHECKSUMS_KEY)?;
    w.write_all(&9u32.to_le_bytes())?;
    w.write_all(&4u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    let checksums_at = w.stream_position()?;
    w.write_all(&vec![0u8; 4 * tensors.len()])?;
    let mut relative = 0u64;
    let mut rel_offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.dims.is_empty() || t.dims.last().unwrap() % t.dtype.block_size() != 0 {
            bail!(
                "{}: rows of {:?} are not whole {:?} blocks",
                t.name,
                t.dims,
                t.dtype
            );
        }
        put_str(&mut w, &t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in t.dims.iter().rev() {
            w.write_all(&(*d as u64).to_le_bytes())?;
        }
        w.write_all(&type_id(t.dtype).to_le_bytes())?;
        w.write_all(&relative.to_le_bytes())?;
        rel_offsets.push(relative);
        relative = (relative + t.bytes()).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    let data_start = w.stream_position()?.div_ceil(ALIGNMENT) * ALIGNMENT;
    w.flush()?;
    drop(w);
    let total = data_start + relative;
    file.set_len(total)?;
    Ok((
        file,
        Layout {
            offsets: rel_offsets.iter().map(|o| data_start + o).collect(),
            sizes: tensors.iter().map(TensorSpec::bytes).collect(),
            checksums_at,
            total,
        },
    ))
}

/// Writes the checksums into the header of a file laid out by [`create`].
pub fn write_checksums(file: &File, layout: &Layout, checksums: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = checksums.iter().flat_map(|c| c.to_le_bytes()).collect();
    file.write_all_at(&bytes, layout.checksums_at)?;
    Ok(())
}
