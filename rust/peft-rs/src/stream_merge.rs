//! Streaming merge: adapters folded into a transformers checkpoint one tensor at a time, so a
//! model far larger than memory can be merged (PEFT's `merge_and_unload` + `save_pretrained`
//! loads the whole model).
//!
//! A [`TensorSource`] gives the checkpoint's layout (shards and their tensors) and reads one
//! tensor at a time; a [`TensorSink`] writes shards of the same layout. [`merge_stream`] connects
//! them through the adapters' merge rules; [`merge_checkpoint`] does it for directories
//! ([`SafetensorsDir`] → [`SafetensorsDirSink`]). Peak memory is about one tensor (plus a
//! targeted module's bias) on top of the adapters: shards are written while they are computed.
//!
//! Module kinds. A checkpoint does not record module types, so the kind of a targeted module
//! `m` is taken from what PEFT wrote when it created the adapter on the real module:
//! - a rank-4 `m.weight` is an `nn.Conv2d` (stride, padding and dilation do not change a merge;
//!   groups are taken as 1);
//! - an adapter whose tensors for `m` are embedding tensors (`lora_embedding_A/B`,
//!   `oft_embedding_R`) makes it an `nn.Embedding`;
//! - an adapter config with `fan_in_fan_out: true` makes it a transformers `Conv1D` (PEFT sets
//!   that field from the wrapped module's type and saves it);
//! - otherwise `nn.Linear`.
//!
//! Weights. `weights[i]` scales adapter `i`'s update: an additive rule (LoRA, LoHa, LoKr, VeRA,
//! AdaLoRA) adds `w·ΔW` (and `w·Δb`). A weight other than 1 is an error for a rule that is not a
//! sum (IA³'s scaling, OFT/BOFT's rotation, DoRA's magnitude) and for an adapter that replaces
//! base tensors (`modules_to_save`, trained biases), which cannot be scaled.
//!
//! Replaced tensors (`modules_to_save`, trained biases, the base weights PEFT saves for adapted
//! embeddings) override the checkpoint's, later adapters over earlier ones; adapters targeting
//! a module then merge into it in the order given.
//!
//! Crash safety. Each shard is written to a temporary file, flushed to disk (`fsync`, in the
//! background while the next shard is written) and only then renamed; the shard index is
//! removed first and written last, so an interrupted merge never leaves a directory that looks
//! complete. Each written shard records a fingerprint of the merge (adapters, weights, dtype,
//! source layout) in its metadata; `resume` skips shards whose header has the expected tensors,
//! shapes, dtypes, size and fingerprint, and rewrites the rest.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{SafeTensors, View};
use serde_json::{Value, json};

use crate::base::{BaseLayer, Conv2dParams, ModuleKind};
use crate::error::{PeftError, Result};
use crate::merge::apply_rule;
use crate::method::{MergeRule, ParamSource};
use crate::model::checkpoint::{SHARD_INDEX, SINGLE_FILE};
use crate::peft_adapter::{ModuleKinds, PeftAdapter};

/// Metadata key of the merge fingerprint in written shards (checked by `resume`).
const FINGERPRINT_KEY: &str = "peft_rs_merge";

/// Name, dtype and shape of one tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn size_in_bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// One weight file of a checkpoint: its file name, its tensors in file order and its
/// safetensors metadata (`{"format": "pt"}` for transformers).
#[derive(Debug, Clone)]
pub struct Shard {
    pub file_name: String,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

/// A checkpoint read one tensor at a time.
pub trait TensorSource {
    /// The shards, in order; every tensor is in exactly one.
    fn shards(&self) -> &[Shard];
    /// Reads one tensor (on the CPU, in its stored dtype).
    fn read(&self, name: &str) -> Result<Tensor>;
    /// The stored dtype and bytes of one tensor, when the source holds them in memory (a
    /// memory-mapped file): unchanged tensors are then written without a copy.
    fn bytes(&self, _name: &str) -> Result<Option<(DType, &[u8])>> {
        Ok(None)
    }
}

/// One output tensor: bytes borrowed from the source (unchanged) or a computed tensor.
pub enum OutputTensor<'a> {
    Stored(&'a [u8]),
    Computed(Tensor),
}

/// Where merged shards go.
pub trait TensorSink {
    /// Called once before any shard is written (a directory removes its index, so that an
    /// interrupted merge does not look complete).
    fn begin(&mut self) -> Result<()>;
    /// Whether `shard` (with these tensors and metadata) is already there, complete.
    fn is_complete(&self, shard: &Shard) -> Result<bool>;
    /// Writes `shard`, taking its tensors from `next` in `shard.tensors`' order.
    fn write_shard<'a>(
        &mut self,
        shard: &Shard,
        next: &mut dyn FnMut(&TensorInfo) -> Result<OutputTensor<'a>>,
    ) -> Result<()>;
    /// Called once every shard is there, with the whole layout (a directory writes its index).
    fn finish(&mut self, shards: &[Shard]) -> Result<()>;
}

/// A safetensors file, memory-mapped, with its parsed header.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PeftError::FileNotFound {
                path: path.to_path_buf(),
            },
            _ => PeftError::io(path, e),
        })?;
        // SAFETY: mapped read-only; like every memory-mapped reader this assumes no other
        // process truncates the file while it is being read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| PeftError::io(path, e))?;
        // Checks the header and that the file holds every byte it announces (truncation).
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| invalid_file(path, e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            metadata,
        })
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| PeftError::MissingKey {
                key: name.to_string(),
                context: format!("not in {}", self.path.display()),
            })?;
        let start = 8 + self.header_len;
        let bytes = &self.map[start + info.data_offsets.0..start + info.data_offsets.1];
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), bytes)
            .map_err(|e| invalid_file(&self.path, e.to_string()))?;
        view.load(&Device::Cpu)
            .map_err(|e| invalid_file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// The stored dtype and bytes of `name` (`None` for a dtype candle lacks).
    fn bytes(&self, name: &str) -> Option<(DType, &[u8])> {
        let info = self.metadata.info(name)?;
        let dtype = DType::try_from(info.dtype).ok()?;
        let start = 8 + self.header_len;
        Some((
            dtype,
            &self.map[start + info.data_offsets.0..start + info.data_offsets.1],
        ))
    }

    /// The tensors in file order.
    fn tensors(&self) -> Result<Vec<TensorInfo>> {
        let mut infos: Vec<_> = self.metadata.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets.0);
        infos
            .into_iter()
            .map(|(name, info)| {
                let dtype = DType::try_from(info.dtype)
                    .map_err(|e| invalid_file(&self.path, format!("tensor `{name}`: {e}")))?;
                Ok(TensorInfo {
                    name,
                    dtype,
                    shape: info.shape.clone(),
                })
            })
            .collect()
    }

    fn file_metadata(&self) -> BTreeMap<String, String> {
        self.metadata
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect()
    }
}

fn invalid_file(path: &Path, reason: String) -> PeftError {
    PeftError::InvalidWeightsFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// A transformers checkpoint directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`, each memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<MappedFile>,
    shards: Vec<Shard>,
    /// Tensor name → index in `files`.
    location: HashMap<String, usize>,
    /// The parsed index, for a sharded checkpoint.
    index: Option<Value>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(SHARD_INDEX);
        let (names, index) = if index_path.is_file() {
            let index = read_json(&index_path)?;
            (shard_names(&index_path, &index)?, Some(index))
        } else if single.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(PeftError::FileNotFound { path: single });
        };
        let mut source = Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            shards: Vec::new(),
            location: HashMap::new(),
            index: None,
        };
        for name in names {
            let file = MappedFile::open(&dir.join(&name))?;
            let tensors = file.tensors()?;
            for t in &tensors {
                if source
                    .location
                    .insert(t.name.clone(), source.files.len())
                    .is_some()
                {
                    return Err(invalid_file(
                        &file.path,
                        format!("tensor `{}` is in more than one shard", t.name),
                    ));
                }
            }
            source.shards.push(Shard {
                file_name: name,
                tensors,
                metadata: file.file_metadata(),
            });
            source.files.push(file);
        }
        if let Some(index) = &index {
            source.check_weight_map(&index_path, index)?;
        }
        source.index = index;
        Ok(source)
    }

    /// Every tensor the index names is in the shard it names.
    fn check_weight_map(&self, index_path: &Path, index: &Value) -> Result<()> {
        for (name, shard) in weight_map(index_path, index)? {
            let found = self.location.get(name).map(|&i| &self.shards[i].file_name);
            if found.map(String::as_str) != Some(shard) {
                return Err(PeftError::MissingKey {
                    key: name.to_string(),
                    context: format!(
                        "{} places it in {shard}, which does not hold it",
                        index_path.display()
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard index, for a sharded checkpoint.
    pub fn index(&self) -> Option<&Value> {
        self.index.as_ref()
    }

    fn file_of(&self, name: &str) -> Result<usize> {
        self.location
            .get(name)
            .copied()
            .ok_or_else(|| PeftError::MissingKey {
                key: name.to_string(),
                context: format!("not in the checkpoint {}", self.dir.display()),
            })
    }
}

impl TensorSource for SafetensorsDir {
    fn shards(&self) -> &[Shard] {
        &self.shards
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        self.files[self.file_of(name)?].read(name)
    }

    fn bytes(&self, name: &str) -> Result<Option<(DType, &[u8])>> {
        Ok(self.files[self.file_of(name)?].bytes(name))
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn weight_map<'a>(path: &Path, index: &'a Value) -> Result<Vec<(&'a str, &'a str)>> {
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid_file(path, "no `weight_map` object".into()))?;
    map.iter()
        .map(|(name, shard)| {
            let shard = shard.as_str().ok_or_else(|| {
                invalid_file(path, format!("`weight_map[{name:?}]` is not a file name"))
            })?;
            Ok((name.as_str(), shard))
        })
        .collect()
}

/// The shard files an index names, sorted, each a plain file name inside the directory.
fn shard_names(path: &Path, index: &Value) -> Result<Vec<String>> {
    let names: BTreeSet<&str> = weight_map(path, index)?.into_iter().map(|e| e.1).collect();
    names
        .into_iter()
        .map(|name| {
            let plain = Path::new(name).file_name().map(|n| n == name) == Some(true);
            if !plain {
                return Err(invalid_file(
                    path,
                    format!("shard {name:?} is not a file name"),
                ));
            }
            Ok(name.to_string())
        })
        .collect()
}

/// Writes shards into a directory (each atomically) and, for a sharded layout, the index with
/// the same `weight_map` and an updated `metadata.total_size`.
pub struct SafetensorsDirSink {
    dir: PathBuf,
    /// The source's index (its other fields are kept); `None` for a single file.
    index: Option<Value>,
    /// Shards written to their temporary file, being flushed to disk and renamed in the
    /// background while the next shard is written.
    finishing: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl SafetensorsDirSink {
    pub fn new(dir: &Path, index: Option<Value>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            finishing: Vec::new(),
        })
    }

    /// Waits until every shard written so far is on disk under its final name.
    fn settle(&mut self) -> Result<()> {
        let mut first_error = None;
        for job in self.finishing.drain(..) {
            let outcome = job.join().unwrap_or_else(|_| {
                Err(PeftError::InvalidOperation(
                    "a shard's flush to disk panicked".into(),
                ))
            });
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for SafetensorsDirSink {
    /// A shard handed to the background is completed even when the merge stops early, so
    /// that what is on disk is either a whole shard or nothing.
    fn drop(&mut self) {
        let _ = self.settle();
    }
}

impl TensorSink for SafetensorsDirSink {
    fn begin(&mut self) -> Result<()> {
        let index = self.dir.join(SHARD_INDEX);
        match std::fs::remove_file(&index) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PeftError::io(&index, e)),
            _ => Ok(()),
        }
    }

    fn is_complete(&self, shard: &Shard) -> Result<bool> {
        let path = self.dir.join(&shard.file_name);
        if !path.is_file() {
            return Ok(false);
        }
        // A file that cannot be parsed (or is truncated) is simply rewritten.
        let Ok(file) = MappedFile::open(&path) else {
            return Ok(false);
        };
        let Ok(found) = file.tensors() else {
            return Ok(false);
        };
        Ok(sorted_by_name(&found) == sorted_by_name(&shard.tensors)
            && file.file_metadata() == shard.metadata)
    }

    fn write_shard<'a>(
        &mut self,
        shard: &Shard,
        next: &mut dyn FnMut(&TensorInfo) -> Result<OutputTensor<'a>>,
    ) -> Result<()> {
        let written = write_shard_file(&self.dir.join(&shard.file_name), shard, next)?;
        self.finishing
            .push(std::thread::spawn(move || written.flush_and_rename()));
        Ok(())
    }

    fn finish(&mut self, shards: &[Shard]) -> Result<()> {
        self.settle()?;
        let Some(index) = &self.index else {
            return Ok(());
        };
        let total: u64 = shards
            .iter()
            .flat_map(|s| &s.tensors)
            .map(TensorInfo::size_in_bytes)
            .sum();
        let weight_map: serde_json::Map<String, Value> = shards
            .iter()
            .flat_map(|s| {
                s.tensors
                    .iter()
                    .map(|t| (t.name.clone(), json!(s.file_name)))
            })
            .collect();
        let mut index = index.clone();
        if let Value::Object(map) = &mut index {
            let metadata = map.entry("metadata").or_insert_with(|| json!({}));
            if let Value::Object(m) = metadata {
                m.insert("total_size".into(), json!(total));
            }
            map.insert("weight_map".into(), Value::Object(weight_map));
        }
        let text = serde_json::to_string_pretty(&index).map_err(|e| PeftError::Json {
            path: self.dir.join(SHARD_INDEX),
            source: e,
        })?;
        crate::io::write_atomic(&self.dir.join(SHARD_INDEX), format!("{text}\n").as_bytes())
    }
}

fn sorted_by_name(tensors: &[TensorInfo]) -> Vec<TensorInfo> {
    let mut sorted = tensors.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
}

/// A shard's complete temporary file, to be flushed to disk and given its name.
struct WrittenShard {
    file: std::fs::File,
    tmp: PathBuf,
    path: PathBuf,
}

impl WrittenShard {
    /// `fsync`, then the rename: the name appears only once every byte is on disk.
    fn flush_and_rename(self) -> Result<()> {
        let result = self
            .file
            .sync_all()
            .map_err(|e| PeftError::io(&self.tmp, e))
            .and_then(|()| {
                std::fs::rename(&self.tmp, &self.path).map_err(|e| PeftError::io(&self.path, e))
            });
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

/// Writes a safetensors file tensor by tensor: the header first (sizes are known from the
/// shapes), then each tensor as `next` produces it, into a temporary file that
/// [`WrittenShard::flush_and_rename`] completes.
fn write_shard_file<'a>(
    path: &Path,
    shard: &Shard,
    next: &mut dyn FnMut(&TensorInfo) -> Result<OutputTensor<'a>>,
) -> Result<WrittenShard> {
    let header = shard_header(shard)?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", shard.file_name, std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 22, file);
        let io = |e| PeftError::io(&tmp, e);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&header).map_err(io)?;
        for info in &shard.tensors {
            match next(info)? {
                OutputTensor::Stored(bytes) => {
                    if bytes.len() as u64 != info.size_in_bytes() {
                        return Err(PeftError::InvalidOperation(format!(
                            "tensor `{}` holds {} bytes, but the shard header says {}",
                            info.name,
                            bytes.len(),
                            info.size_in_bytes()
                        )));
                    }
                    out.write_all(bytes).map_err(io)?;
                }
                OutputTensor::Computed(tensor) => {
                    if tensor.dims() != info.shape.as_slice() || tensor.dtype() != info.dtype {
                        return Err(PeftError::InvalidOperation(format!(
                            "tensor `{}` was produced as {:?} {:?}, but the shard header says {:?} {:?}",
                            info.name,
                            tensor.dtype(),
                            tensor.dims(),
                            info.dtype,
                            info.shape
                        )));
                    }
                    out.write_all(&tensor.data()).map_err(io)?;
                }
            }
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        Ok(WrittenShard {
            file,
            tmp: tmp.clone(),
            path: path.to_path_buf(),
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The JSON header of a safetensors file holding `shard`'s tensors in order, padded with spaces
/// to a multiple of 8 bytes as the safetensors library does.
fn shard_header(shard: &Shard) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !shard.metadata.is_empty() {
        header.insert("__metadata__".into(), json!(shard.metadata));
    }
    let mut offset = 0u64;
    for info in &shard.tensors {
        let end = offset + info.size_in_bytes();
        let dtype = serde_json::to_value(safetensors::Dtype::from(info.dtype))
            .map_err(|e| PeftError::InvalidOperation(format!("dtype of `{}`: {e}", info.name)))?;
        header.insert(
            info.name.clone(),
            json!({"dtype": dtype, "shape": info.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| PeftError::InvalidOperation(format!("shard header: {e}")))?;
    bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
    Ok(bytes)
}

/// What [`merge_stream`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeSummary {
    /// Shards written, in order.
    pub written: Vec<String>,
    /// Shards found complete and skipped (`resume`).
    pub skipped: Vec<String>,
    /// Bytes of tensors in the output.
    pub total_bytes: u64,
}

/// An adapter with the weight its update is scaled by.
#[derive(Debug)]
struct Weighted {
    adapter: PeftAdapter,
    weight: f64,
    /// For messages: the adapter's directory.
    label: String,
}

/// What the merge does to a checkpoint, worked out before any tensor is read.
struct Plan {
    adapters: Vec<Weighted>,
    kinds: ModuleKinds,
    /// Tensors replaced outright (later adapters win).
    replaced: HashMap<String, Tensor>,
    dtype: Option<DType>,
}

/// Merges `adapters` (each with its weight) into the checkpoint of `source`, writing it to
/// `sink` in the same layout; `dtype` converts every floating tensor (before merging, as loading
/// the model in that dtype would). `progress(done, total)` is called after each tensor with bytes
/// of the output; an error from it stops the merge.
pub fn merge_stream(
    source: &dyn TensorSource,
    sink: &mut dyn TensorSink,
    adapters: Vec<(PeftAdapter, f64, String)>,
    dtype: Option<DType>,
    resume: bool,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<MergeSummary> {
    let plan = Plan::new(source, adapters, dtype)?;
    let fingerprint = plan.fingerprint(source.shards());
    let shards: Vec<Shard> = source
        .shards()
        .iter()
        .map(|s| plan.output_shard(s, &fingerprint))
        .collect();
    let total: u64 = shards
        .iter()
        .flat_map(|s| &s.tensors)
        .map(TensorInfo::size_in_bytes)
        .sum();
    let mut summary = MergeSummary {
        total_bytes: total,
        ..Default::default()
    };
    sink.begin()?;
    let mut done = 0u64;
    let mut pending_biases: HashMap<String, Tensor> = HashMap::new();
    for shard in &shards {
        if resume && sink.is_complete(shard)? {
            done += shard
                .tensors
                .iter()
                .map(TensorInfo::size_in_bytes)
                .sum::<u64>();
            progress(done, total)?;
            summary.skipped.push(shard.file_name.clone());
            continue;
        }
        sink.write_shard(shard, &mut |info| {
            let tensor = plan.output_tensor(source, info, &mut pending_biases)?;
            done += info.size_in_bytes();
            progress(done, total)?;
            Ok(tensor)
        })?;
        summary.written.push(shard.file_name.clone());
    }
    sink.finish(&shards)?;
    Ok(summary)
}

impl Plan {
    fn new(
        source: &dyn TensorSource,
        adapters: Vec<(PeftAdapter, f64, String)>,
        dtype: Option<DType>,
    ) -> Result<Self> {
        let infos: HashMap<&str, &TensorInfo> = source
            .shards()
            .iter()
            .flat_map(|s| &s.tensors)
            .map(|t| (t.name.as_str(), t))
            .collect();
        let adapters: Vec<Weighted> = adapters
            .into_iter()
            .map(|(adapter, weight, label)| Weighted {
                adapter,
                weight,
                label,
            })
            .collect();
        let mut kinds = ModuleKinds::new();
        let mut replaced = HashMap::new();
        for a in &adapters {
            check_weight(a)?;
            for module in a.adapter.module_names() {
                let weight = format!("{module}.weight");
                let info = infos.get(weight.as_str()).ok_or_else(|| PeftError::MissingKey {
                    key: weight.clone(),
                    context: format!(
                        "adapter {} targets module `{module}`, which the checkpoint does not have",
                        a.label
                    ),
                })?;
                let kind = module_kind(&adapters, module, info)?;
                kinds.insert(module.to_string(), kind);
            }
            for (key, tensor) in a.adapter.replaced_tensors() {
                let info = infos
                    .get(key.as_str())
                    .ok_or_else(|| PeftError::MissingKey {
                        key: key.clone(),
                        context: format!(
                            "adapter {} replaces it, but the checkpoint does not have it",
                            a.label
                        ),
                    })?;
                if info.shape != tensor.dims() {
                    return Err(PeftError::shape(key.clone(), &info.shape, tensor.dims()));
                }
                replaced.insert(key.clone(), tensor.clone());
            }
        }
        let mut plan = Self {
            adapters,
            kinds,
            replaced,
            dtype,
        };
        plan.resolve_shared(&infos)?;
        Ok(plan)
    }

    /// Regenerates adapter-wide tensors a file left out (VeRA's projections) from the shapes of
    /// the targeted weights, without reading them (stride-0 stand-ins carry the shapes).
    fn resolve_shared(&mut self, infos: &HashMap<&str, &TensorInfo>) -> Result<()> {
        for a in &mut self.adapters {
            if !a.adapter.needs_model_shapes() {
                continue;
            }
            let mut shapes = HashMap::new();
            for module in a.adapter.module_names() {
                let key = format!("{module}.weight");
                if let Some(info) = infos.get(key.as_str()) {
                    let stand_in = Tensor::zeros((), info.dtype, &Device::Cpu)?
                        .broadcast_as(info.shape.as_slice())?;
                    shapes.insert(key, stand_in);
                }
            }
            a.adapter.with_shared_from(&shapes, &self.kinds)?;
        }
        Ok(())
    }

    fn out_dtype(&self, dtype: DType) -> DType {
        match self.dtype {
            Some(d) if dtype.is_float() && !is_f8(dtype) => d,
            _ => dtype,
        }
    }

    /// The output shard: same tensors and shapes, output dtypes, the fingerprint added.
    fn output_shard(&self, shard: &Shard, fingerprint: &str) -> Shard {
        let mut metadata = shard.metadata.clone();
        metadata.insert(FINGERPRINT_KEY.into(), fingerprint.into());
        Shard {
            file_name: shard.file_name.clone(),
            tensors: shard
                .tensors
                .iter()
                .map(|t| TensorInfo {
                    dtype: self.out_dtype(t.dtype),
                    ..t.clone()
                })
                .collect(),
            metadata,
        }
    }

    /// A digest of everything that decides the output (a resumed merge must be the same merge).
    fn fingerprint(&self, shards: &[Shard]) -> String {
        let mut h = DefaultHasher::new();
        for a in &self.adapters {
            a.adapter.config().to_json().to_string().hash(&mut h);
            a.weight.to_bits().hash(&mut h);
            for (key, tensor) in a.adapter.to_state_dict() {
                key.hash(&mut h);
                tensor.dims().hash(&mut h);
                tensor.data().hash(&mut h);
            }
        }
        format!("{:?}", self.dtype).hash(&mut h);
        for shard in shards {
            shard.file_name.hash(&mut h);
            for t in &shard.tensors {
                (&t.name, format!("{:?}", t.dtype), &t.shape).hash(&mut h);
            }
        }
        format!("{:016x}", h.finish())
    }

    /// The output tensor `name`: merged, replaced or copied, in its output dtype.
    fn output_tensor<'s>(
        &self,
        source: &'s dyn TensorSource,
        info: &TensorInfo,
        pending_biases: &mut HashMap<String, Tensor>,
    ) -> Result<OutputTensor<'s>> {
        let name = info.name.as_str();
        if let Some(module) = name
            .strip_suffix(".weight")
            .filter(|m| self.kinds.contains_key(*m))
        {
            let (weight, bias) = self.merged_module(source, module)?;
            if let Some(bias) = bias {
                pending_biases.insert(format!("{module}.bias"), bias);
            }
            return Ok(OutputTensor::Computed(weight));
        }
        if let Some(module) = name
            .strip_suffix(".bias")
            .filter(|m| self.kinds.contains_key(*m))
        {
            if let Some(bias) = pending_biases.remove(name) {
                return Ok(OutputTensor::Computed(bias));
            }
            // The weight is in a shard written earlier (or skipped on resume): merge again.
            let (_, bias) = self.merged_module(source, module)?;
            return bias
                .map(OutputTensor::Computed)
                .ok_or_else(|| PeftError::MissingKey {
                    key: name.to_string(),
                    context: "the merged module has no bias".into(),
                });
        }
        // Unchanged and in its stored dtype: its bytes go out as they are, with no copy.
        if !self.replaced.contains_key(name)
            && let Some((dtype, bytes)) = source.bytes(name)?
            && dtype == info.dtype
        {
            return Ok(OutputTensor::Stored(bytes));
        }
        Ok(OutputTensor::Computed(self.input_tensor(source, name)?))
    }

    /// A checkpoint tensor (or its replacement) in its output dtype.
    fn input_tensor(&self, source: &dyn TensorSource, name: &str) -> Result<Tensor> {
        let original = source.read(name)?;
        let tensor = match self.replaced.get(name) {
            Some(r) => r.to_dtype(original.dtype())?,
            None => original,
        };
        let dtype = self.out_dtype(tensor.dtype());
        Ok(tensor.to_dtype(dtype)?)
    }

    /// `module`'s weight and bias with every adapter targeting it merged, in order.
    fn merged_module(
        &self,
        source: &dyn TensorSource,
        module: &str,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let kind = self.kinds[module];
        let weight = self.input_tensor(source, &format!("{module}.weight"))?;
        let bias_key = format!("{module}.bias");
        let has_bias = source
            .shards()
            .iter()
            .any(|s| s.tensors.iter().any(|t| t.name == bias_key));
        let bias = has_bias
            .then(|| self.input_tensor(source, &bias_key))
            .transpose()?;
        let (dtype, bias_dtype) = (weight.dtype(), bias.as_ref().map(Tensor::dtype));
        let mut base = BaseLayer::new(kind, weight, bias)?;
        for a in &self.adapters {
            let Ok(tensors) = a.adapter.tensors(module) else {
                continue;
            };
            let config = a.adapter.config();
            let source = ParamSource::Given(tensors.to_vec());
            let layer = config.build(module, &base, source, a.adapter.shared())?;
            let rule = weighted(layer.merge_rule(&base)?, a, module)?;
            let (w, b, _) = apply_rule(&base, &rule, &base.weight()?, base.bias())?;
            base.set_weights(w, b, true)?;
        }
        let weight = base.weight()?.to_dtype(dtype)?;
        let bias = match (base.bias(), bias_dtype) {
            (Some(b), Some(d)) => Some(b.to_dtype(d)?),
            (b, _) => b.cloned(),
        };
        Ok((weight, bias))
    }
}

fn is_f8(dtype: DType) -> bool {
    dtype.size_in_bytes() == 1
}

/// A weight other than 1 is allowed only where it has a meaning: a sum's update.
fn check_weight(a: &Weighted) -> Result<()> {
    if !a.weight.is_finite() {
        return Err(PeftError::InvalidOperation(format!(
            "adapter {}: weight must be finite, found {}",
            a.label, a.weight
        )));
    }
    if a.weight != 1.0 && !a.adapter.replaced_tensors().is_empty() {
        return Err(PeftError::InvalidOperation(format!(
            "adapter {} replaces base tensors (modules_to_save or trained biases), which a weight \
             ({}) cannot scale",
            a.label, a.weight
        )));
    }
    Ok(())
}

/// `rule` with its update scaled by the adapter's weight.
fn weighted(rule: MergeRule, a: &Weighted, module: &str) -> Result<MergeRule> {
    if a.weight == 1.0 {
        return Ok(rule);
    }
    match rule {
        MergeRule::Add { delta, bias } => Ok(MergeRule::Add {
            delta: delta.affine(a.weight, 0.0)?,
            bias: bias.map(|b| b.affine(a.weight, 0.0)).transpose()?,
        }),
        MergeRule::AddProduct {
            left,
            right,
            scale,
            bias,
        } => Ok(MergeRule::AddProduct {
            left,
            right,
            scale: scale * a.weight,
            bias: bias.map(|b| b.affine(a.weight, 0.0)).transpose()?,
        }),
        _ => Err(PeftError::InvalidOperation(format!(
            "adapter {} ({}) on `{module}` does not merge as an added update, so it cannot be \
             weighted (weight {}); only additive methods (LoRA, LoHa, LoKr, VeRA, AdaLoRA \
             without DoRA) take weights other than 1",
            a.label,
            a.adapter.config().peft_type(),
            a.weight
        ))),
    }
}

/// The kind of `module` (see the module docs): from the weight's rank, the adapters' tensor
/// names and their configs' `fan_in_fan_out`.
fn module_kind(adapters: &[Weighted], module: &str, weight: &TensorInfo) -> Result<ModuleKind> {
    if weight.shape.len() == 4 {
        return Ok(ModuleKind::Conv2d(Conv2dParams::default()));
    }
    let mut embedding = false;
    let mut conv1d = false;
    for a in adapters {
        let Ok(tensors) = a.adapter.tensors(module) else {
            continue;
        };
        embedding |= tensors
            .iter()
            .any(|(n, _)| n.starts_with("lora_embedding_") || n.starts_with("oft_embedding_"));
        conv1d |= a.adapter.config().to_json().get("fan_in_fan_out") == Some(&Value::Bool(true));
    }
    match (embedding, conv1d) {
        (true, true) => Err(PeftError::InvalidOperation(format!(
            "`{module}`: one adapter has embedding tensors for it, another fan_in_fan_out=true"
        ))),
        (true, false) => Ok(ModuleKind::Embedding),
        (false, true) => Ok(ModuleKind::Conv1D),
        (false, false) => Ok(ModuleKind::Linear),
    }
}

/// Merges the adapters in `adapter_dirs` into the transformers checkpoint in `base_dir` and
/// writes it to `out_dir` with the same shards and index, copying every other file of
/// `base_dir` (config, tokenizer...) unchanged. See the module docs for kinds, weights, dtype
/// and resume.
pub fn merge_checkpoint(
    base_dir: &Path,
    adapter_dirs: &[&Path],
    weights: Option<&[f64]>,
    out_dir: &Path,
    dtype: Option<DType>,
    resume: bool,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<MergeSummary> {
    if adapter_dirs.is_empty() {
        return Err(PeftError::InvalidOperation(
            "merge_checkpoint needs at least one adapter directory".into(),
        ));
    }
    let weights = match weights {
        Some(w) if w.len() != adapter_dirs.len() => {
            return Err(PeftError::InvalidOperation(format!(
                "{} weights given for {} adapters",
                w.len(),
                adapter_dirs.len()
            )));
        }
        Some(w) => w.to_vec(),
        None => vec![1.0; adapter_dirs.len()],
    };
    if same_dir(base_dir, out_dir) {
        return Err(PeftError::InvalidOperation(format!(
            "the output directory {} is the checkpoint's own directory",
            out_dir.display()
        )));
    }
    let source = SafetensorsDir::open(base_dir)?;
    let adapters = adapter_dirs
        .iter()
        .zip(weights)
        .map(|(dir, w)| {
            let adapter = PeftAdapter::from_pretrained(dir, None)?;
            Ok((adapter, w, dir.display().to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sink = SafetensorsDirSink::new(out_dir, source.index().cloned())?;
    copy_other_files(base_dir, out_dir, &source)?;
    merge_stream(&source, &mut sink, adapters, dtype, resume, progress)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Weight files of other formats hold the unmerged weights: they are not copied.
fn is_weight_file(name: &str) -> bool {
    let weight_ext = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
    ];
    weight_ext.iter().any(|e| name.ends_with(e)) || name.ends_with(".index.json")
}

/// Copies every file of `base_dir` but the weights (recursively), each atomically.
fn copy_other_files(base_dir: &Path, out_dir: &Path, source: &SafetensorsDir) -> Result<()> {
    let skip: BTreeSet<&str> = source
        .shards()
        .iter()
        .map(|s| s.file_name.as_str())
        .collect();
    let out = out_dir
        .canonicalize()
        .map_err(|e| PeftError::io(out_dir, e))?;
    copy_tree(base_dir, out_dir, &out, &|name| {
        skip.contains(name) || is_weight_file(name)
    })
}

/// Copies `from` into `to`, leaving out files `skip` names (at this level) and the output
/// directory itself (`out`, canonical) should it lie inside `from`.
fn copy_tree(from: &Path, to: &Path, out: &Path, skip: &dyn Fn(&str) -> bool) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(|e| PeftError::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| PeftError::io(from, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let target = to.join(&name);
        if path.is_dir() {
            if path.canonicalize().is_ok_and(|p| out.starts_with(p)) {
                continue;
            }
            std::fs::create_dir_all(&target).map_err(|e| PeftError::io(&target, e))?;
            copy_tree(&path, &target, out, &|_| false)?;
        } else if path.is_file() && !skip(&name) {
            let bytes = std::fs::read(&path).map_err(|e| PeftError::io(&path, e))?;
            crate::io::write_atomic(&target, &bytes)?;
        }
    }
    Ok(())
}
