//! The two weight stores the model loader is handed (`mistralrs::core::zopilot_weights`): a
//! mapped GGUF file that supplies every quantized tensor ([`Replay`], checked against its
//! CRC-32 as it is read), and a file being written while in-situ quantization runs
//! ([`Recorder`]: each tensor goes to its final offset from a writer thread behind a bounded
//! channel, so writing overlaps quantizing and at most two tensors wait in memory).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use mistralrs::core::zopilot_weights::{StoredTensor, WeightStore};

use super::gguf::{self, Layout, Meta};
use super::layout::{Entry, Kind, permute_rows};

/// A tensor of a mapped file.
#[derive(Debug, Clone)]
pub struct Slot {
    pub entry: Entry,
    pub dtype: GgmlDType,
    pub offset: usize,
    pub len: usize,
    pub checksum: Option<u32>,
}

/// A GGUF file mapped read-only, its tensors by Hugging Face name.
pub struct Replay {
    map: memmap2::Mmap,
    slots: HashMap<String, Slot>,
    /// The first tensor whose bytes did not match their checksum.
    corrupted: Mutex<Option<String>>,
}

impl Replay {
    pub fn new(file: &File, slots: Vec<Slot>) -> Result<Self> {
        // SAFETY: the file is ours and only ever replaced by rename, never written in place.
        let map = unsafe { memmap2::Mmap::map(file)? };
        for s in &slots {
            if s.offset + s.len > map.len() {
                bail!(
                    "{} ends past the end of the file (truncated)",
                    s.entry.spec.name
                );
            }
        }
        Ok(Self {
            map,
            slots: slots.into_iter().map(|s| (s.entry.hf.clone(), s)).collect(),
            corrupted: Mutex::new(None),
        })
    }

    /// The checked bytes of the tensor with Hugging Face name `hf`, in the file's row order.
    pub fn bytes(&self, hf: &str) -> Result<(&Slot, &[u8])> {
        let slot = self
            .slots
            .get(hf)
            .with_context(|| format!("no tensor for {hf}"))?;
        let bytes = &self.map[slot.offset..slot.offset + slot.len];
        if let Some(want) = slot.checksum {
            let got = crc32fast::hash(bytes);
            if got != want {
                let name = slot.entry.spec.name.clone();
                self.corrupted.lock().unwrap().get_or_insert(name.clone());
                bail!("{name}: checksum {got:08x}, the file's table says {want:08x}");
            }
        }
        Ok((slot, bytes))
    }

    /// The tensor whose checksum failed, if one did.
    pub fn corrupted(&self) -> Option<String> {
        self.corrupted.lock().unwrap().clone()
    }

    /// Bytes of the quantized tensors, what a load reads through [`WeightStore::get`].
    pub fn quantized_bytes(&self) -> u64 {
        self.slots(Kind::Quantized).map(|s| s.len as u64).sum()
    }

    /// Every tensor of `kind`, by Hugging Face name.
    pub fn slots(&self, kind: Kind) -> impl Iterator<Item = &Slot> {
        self.slots.values().filter(move |s| s.entry.kind == kind)
    }
}

impl WeightStore for Replay {
    fn contains(&self, name: &str) -> bool {
        self.slots
            .get(name)
            .is_some_and(|s| s.entry.kind == Kind::Quantized)
    }

    fn get(&self, name: &str) -> candle_core::Result<Option<StoredTensor<'_>>> {
        if !self.contains(name) {
            return Ok(None);
        }
        let (slot, bytes) = self
            .bytes(name)
            .map_err(|e| candle_core::Error::Msg(format!("quantized-weights file: {e:#}")))?;
        super::progress::advance(bytes.len() as u64);
        let bytes = match slot.entry.permute_heads {
            Some(heads) => Cow::Owned(permute_rows(bytes, slot.entry.spec.dims[0], heads, false)),
            None => Cow::Borrowed(bytes),
        };
        Ok(Some(StoredTensor {
            dtype: slot.dtype,
            dims: slot.entry.spec.dims.clone(),
            bytes,
        }))
    }

    fn put(&self, _: &str, _: StoredTensor<'_>) -> candle_core::Result<()> {
        Ok(())
    }
}

/// What a recorder needs once the checkpoint is on disk (after a Hub download): the
/// directory holding config.json, tokenizer files and safetensors.
pub type Locate = Box<dyn Fn() -> Result<PathBuf> + Send + Sync>;

/// Lays out the file once the first quantized tensor (and so the type) is known.
pub type Plan = Box<dyn Fn(&Path, GgmlDType) -> Result<Planned> + Send + Sync>;

/// A laid-out file: its entries and metadata.
pub struct Planned {
    pub entries: Vec<Entry>,
    pub meta: Vec<(&'static str, Meta)>,
}

struct Open {
    file: Arc<File>,
    layout: Layout,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    source: PathBuf,
    dtype: GgmlDType,
    tx: Option<SyncSender<(usize, Vec<u8>)>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// A file being written while the model is quantized; [`Recorder::finish`] completes it.
pub struct Recorder {
    tmp: PathBuf,
    locate: Locate,
    plan: Plan,
    open: Mutex<Option<Open>>,
    checksums: Arc<Mutex<Vec<Option<u32>>>>,
    failed: Arc<Mutex<Option<String>>>,
}

impl Recorder {
    pub fn new(tmp: PathBuf, locate: Locate, plan: Plan) -> Self {
        Self {
            tmp,
            locate,
            plan,
            open: Mutex::new(None),
            checksums: Arc::new(Mutex::new(Vec::new())),
            failed: Arc::new(Mutex::new(None)),
        }
    }

    fn fail(&self, why: String) {
        self.failed.lock().unwrap().get_or_insert(why);
    }

    fn open(&self, dtype: GgmlDType) -> Result<Open> {
        let source = (self.locate)()?;
        let planned = (self.plan)(&source, dtype)?;
        let specs: Vec<_> = planned.entries.iter().map(|e| e.spec.clone()).collect();
        let meta: Vec<(&str, Meta)> = planned.meta.iter().map(|(k, v)| (*k, v.clone())).collect();
        let (file, layout) = gguf::create(&self.tmp, &meta, &specs)?;
        let file = Arc::new(file);
        let quantized: u64 = planned
            .entries
            .iter()
            .zip(&layout.sizes)
            .filter(|(e, _)| e.kind == Kind::Quantized)
            .map(|(_, n)| n)
            .sum();
        super::progress::begin(
            "quantizing (and writing the quantized-weights cache)",
            quantized,
        );
        *self.checksums.lock().unwrap() = vec![None; specs.len()];
        let (tx, rx) = sync_channel::<(usize, Vec<u8>)>(2);
        let (f, offsets, sums, failed) = (
            file.clone(),
            layout.offsets.clone(),
            self.checksums.clone(),
            self.failed.clone(),
        );
        let writer = std::thread::Builder::new()
            .name("quant-cache-writer".into())
            .spawn(move || {
                for (i, bytes) in rx {
                    match f.write_all_at(&bytes, offsets[i]) {
                        Ok(()) => sums.lock().unwrap()[i] = Some(crc32fast::hash(&bytes)),
                        Err(e) => {
                            failed
                                .lock()
                                .unwrap()
                                .get_or_insert(format!("writing: {e}"));
                        }
                    }
                }
            })?;
        Ok(Open {
            file,
            layout,
            index: planned
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.hf.clone(), i))
                .collect(),
            entries: planned.entries,
            source,
            dtype,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Completes the file: waits for the writer, copies the embedding and norms from the
    /// checkpoint, writes the checksums and renames the file to `dest`. An error leaves no
    /// file at `dest` (and removes the temporary one).
    pub fn finish(&self, dest: &Path) -> Result<()> {
        let result = self.complete(dest);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }

    fn complete(&self, dest: &Path) -> Result<()> {
        let mut guard = self.open.lock().unwrap();
        let Some(open) = guard.as_mut() else {
            bail!("no tensor was quantized while loading");
        };
        drop(open.tx.take());
        if let Some(w) = open.writer.take() {
            w.join()
                .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
        }
        if let Some(why) = self.failed.lock().unwrap().clone() {
            bail!("{why}");
        }
        let plain: Vec<_> = open
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == Kind::Plain)
            .collect();
        let checkpoint = super::checkpoint::Checkpoint::open(&open.source)?;
        for (i, e) in plain {
            let bytes = checkpoint.read(&e.hf, e.spec.dtype, &e.spec.dims)?;
            open.file.write_all_at(&bytes, open.layout.offsets[i])?;
            self.checksums.lock().unwrap()[i] = Some(crc32fast::hash(&bytes));
        }
        let sums = self.checksums.lock().unwrap().clone();
        let missing: Vec<_> = sums
            .iter()
            .zip(&open.entries)
            .filter(|(s, _)| s.is_none())
            .map(|(_, e)| e.spec.name.as_str())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} tensors were not quantized by the path that records them (first: {})",
                missing.len(),
                missing[0]
            );
        }
        let sums: Vec<u32> = sums.into_iter().flatten().collect();
        gguf::write_checksums(&open.file, &open.layout, &sums)?;
        open.file.sync_all()?;
        std::fs::rename(&self.tmp, dest)?;
        Ok(())
    }
}

impl WeightStore for Recorder {
    fn contains(&self, _: &str) -> bool {
        false
    }

    fn get(&self, _: &str) -> candle_core::Result<Option<StoredTensor<'_>>> {
        Ok(None)
    }

    fn put(&self, name: &str, t: StoredTensor<'_>) -> candle_core::Result<()> {
        let mut guard = self.open.lock().unwrap();
        if guard.is_none() {
            match self.open(t.dtype) {
                Ok(open) => *guard = Some(open),
                Err(e) => {
                    self.fail(format!("laying out the file: {e:#}"));
                    return Ok(());
                }
            }
        }
        let open = guard.as_ref().expect("opened above");
        let Some(&i) = open.index.get(name) else {
            self.fail(format!("{name} is not a tensor of the layout"));
            return Ok(());
        };
        let e = &open.entries[i];
        if t.dtype != open.dtype || t.dims != e.spec.dims {
            self.fail(format!(
                "{name} came as {:?} {:?}, the layout has {:?} {:?}",
                t.dtype, t.dims, open.dtype, e.spec.dims
            ));
            return Ok(());
        }
        let bytes = match e.permute_heads {
            Some(heads) => permute_rows(&t.bytes, e.spec.dims[0], heads, true),
            None => t.bytes.into_owned(),
        };
        super::progress::advance(bytes.len() as u64);
        let tx = open.tx.clone();
        // Send outside the lock: the writer may be busy with the previous tensor.
        drop(guard);
        if let Some(tx) = tx {
            let _ = tx.send((i, bytes));
        }
        Ok(())
    }
}
