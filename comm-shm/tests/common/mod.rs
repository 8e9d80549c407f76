//! Test helpers: a file-based store for multi-process tests, data builders
//! and reference reductions.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use comm_core::reduce::{finish_avg, reduce_into};
use comm_core::{bf16, f16, CommError, DType, Deadline, Element, ReduceOp, Result, Store, Tensor};

/// A [`Store`] in a directory, shared by processes: one file per key,
/// written by rename, counters under `flock`.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

fn hex(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

impl FileStore {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        fs::create_dir_all(dir.as_ref()).unwrap();
        FileStore {
            dir: dir.as_ref().to_path_buf(),
        }
    }
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("k{}", hex(key)))
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(
            ".tmp.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::write(&tmp, value).map_err(|e| CommError::io("file store write", e))?;
        fs::rename(&tmp, self.path(key)).map_err(|e| CommError::io("file store rename", e))
    }
    fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let lock: File = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))
            .map_err(|e| CommError::io("file store lock", e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| CommError::io("flock", e.into()))?;
        f()
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.put(key, value)
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let dl = Deadline::after(timeout);
        loop {
            if let Some(v) = self.try_get(key)? {
                return Ok(v);
            }
            dl.check(
                || format!("file store get `{key}`"),
                || vec![key.to_string()],
            )?;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CommError::io("file store read", e)),
        }
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.locked(|| {
            let cur = match self.try_get(key)? {
                None => 0,
                Some(v) => String::from_utf8_lossy(&v)
                    .trim()
                    .parse::<i64>()
                    .unwrap_or(0),
            };
            let new = cur + delta;
            self.put(key, new.to_string().as_bytes())?;
            Ok(new)
        })
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let dl = Deadline::after(timeout);
        for k in keys {
            self.get(k, dl.remaining())?;
        }
        Ok(())
    }
    fn delete(&self, key: &str) -> Result<bool> {
        Ok(fs::remove_file(self.path(key)).is_ok())
    }
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        self.locked(|| {
            let cur = self.try_get(key)?;
            if cur.as_deref() == expected {
                self.put(key, desired)?;
                Ok(desired.to_vec())
            } else {
                Ok(cur.unwrap_or_default())
            }
        })
    }
    fn num_keys(&self) -> Result<usize> {
        Ok(fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0))
    }
}

/// A tensor of `dt` holding `vals` (converted as `Element::from_f64` does).
pub fn make(dt: DType, vals: &[f64]) -> Tensor {
    fn conv<T: Element>(v: &[f64]) -> Tensor {
        Tensor::from_vec1(v.iter().map(|x| T::from_f64(*x)).collect::<Vec<T>>())
    }
    match dt {
        DType::F32 => conv::<f32>(vals),
        DType::F64 => conv::<f64>(vals),
        DType::F16 => conv::<f16>(vals),
        DType::BF16 => conv::<bf16>(vals),
        DType::I8 => conv::<i8>(vals),
        DType::U8 => conv::<u8>(vals),
        DType::I32 => conv::<i32>(vals),
        DType::I64 => conv::<i64>(vals),
    }
}

/// Deterministic input of `rank` with `n` elements (small values, fractional
/// for floats, so that order of reduction matters for rounding).
pub fn input(dt: DType, rank: usize, n: usize, salt: usize) -> Tensor {
    let v: Vec<f64> = (0..n)
        .map(|i| {
            let x = ((rank * 7919 + i * 104_729 + salt * 31) % 13) as f64 + 1.0;
            if dt.is_float() {
                x / 3.0 + (i % 5) as f64 * 0.001
            } else {
                x
            }
        })
        .collect();
    make(dt, &v)
}

/// Reduction of `inputs` in rank order with comm-core's kernels.
pub fn reference(inputs: &[Tensor], op: ReduceOp) -> Tensor {
    let mut out = inputs[0].try_clone().unwrap();
    let dt = out.dtype();
    for t in &inputs[1..] {
        reduce_into(out.as_bytes_mut().unwrap(), t.as_bytes().unwrap(), dt, op).unwrap();
    }
    if op == ReduceOp::Avg {
        finish_avg(out.as_bytes_mut().unwrap(), dt, inputs.len()).unwrap();
    }
    out
}

/// Concatenation of byte views.
pub fn concat(ts: &[Tensor]) -> Vec<u8> {
    ts.iter()
        .flat_map(|t| t.as_bytes().unwrap().to_vec())
        .collect()
}

/// Small deterministic PRNG (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// FNV-1a 64.
pub fn checksum(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// A unique job id for a test, so leak checks see only its segments.
pub fn job(tag: &str) -> String {
    format!(
        "t{}{}{}",
        tag,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}
