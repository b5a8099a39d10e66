//! Checkpoints, shard by shard: a directory holding `config.toml` (the model config), `trainer.toml` (step,
//! seed, optimizer config) and one binary file per shard the instance holds (`trunk.shard`,
//! `expert-<layer>-<index>.shard`).
//!
//! A shard file carries its parameters, its AdamW moments and (for the trunk) the router biases:
//!
//! ```text
//! offset size  field
//! 0      8     magic "MANASHRD"
//! 8      4     version (u32 LE) = 1
//! 12     4     kind: 0 trunk, 1 expert
//! 16     4     layer (u32, 0 for the trunk)
//! 20     4     index (u32, 0 for the trunk)
//! 24     8     step (u64)
//! 32     8     P: parameter count (u64)
//! 40     8     R: router-bias count (u64)
//! 48     4·P   parameters (f32 LE), then 4·P first moments, 4·P second moments, 4·R router biases
//! end-8  8     FNV-1a 64 of every byte before it
//! ```
//!
//! Reading checks the header against what the caller expects (shard id and sizes) before allocating, then
//! the total length and the checksum, so a truncated, corrupt or foreign file is a typed error.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::model::ShardId;

/// First 8 bytes of every shard file.
pub const SHARD_MAGIC: [u8; 8] = *b"MANASHRD";
/// The only shard-file version this build writes and reads.
pub const SHARD_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 48;
/// Largest text file (config.toml, trainer.toml) we read.
pub const MAX_TEXT_BYTES: u64 = 1 << 20;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not start with [`SHARD_MAGIC`].
    #[error("{path}: not a mana shard file (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The file's version is not [`SHARD_VERSION`].
    #[error("{path}: unsupported shard file version {version}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it declares.
        version: u32,
    },
    /// The file holds another shard than the one expected.
    #[error("{path}: holds shard {found}, expected {expected}")]
    WrongShard {
        /// The file.
        path: PathBuf,
        /// The shard the caller asked for.
        expected: ShardId,
        /// The shard the header names (or a description of an unknown kind).
        found: String,
    },
    /// A size in the header, or the file's length, is not what the model needs.
    #[error("{path}: {what} is {actual}, expected {expected}")]
    Size {
        /// The file.
        path: PathBuf,
        /// Which size.
        what: &'static str,
        /// What the model needs.
        expected: u64,
        /// What the file has.
        actual: u64,
    },
    /// The checksum does not match the content.
    #[error("{path}: checksum mismatch (file corrupt)")]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// A text file (config.toml, trainer.toml) is invalid.
    #[error("{path}: {reason}")]
    Text {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

/// One shard's complete state: everything a shard file stores, and the one shard-state type of the workspace
/// (the engine's rounds, the network's shard blobs and `mana train`'s checkpoints all use it). Its bytes
/// ([`ShardRecord::to_bytes`]) are deterministic, so every holder that computes the same state writes the
/// same blob.
///
/// What `opt_m` / `opt_v` hold depends on who updates the shard: AdamW's first and second moments (one
/// machine, and the network's `sync` rule), or the outer Nesterov buffer and zeros (the network's `diloco`
/// rule). Both always have the parameters' length, so the layout never depends on the rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRecord {
    /// Which shard.
    pub shard: ShardId,
    /// Optimizer steps taken when it was written.
    pub step: u64,
    /// Its parameters.
    pub params: Vec<f32>,
    /// The optimizer's first moments (or the outer Nesterov buffer); same length as `params`.
    pub opt_m: Vec<f32>,
    /// The optimizer's second moments (or zeros); same length as `params`.
    pub opt_v: Vec<f32>,
    /// Router biases of every MoE layer, concatenated (trunk only; empty for experts).
    pub router_bias: Vec<f32>,
}

/// The file name of a shard inside a checkpoint directory.
pub fn shard_file_name(shard: ShardId) -> String {
    match shard {
        ShardId::Trunk => "trunk.shard".to_string(),
        ShardId::Expert { layer, index } => format!("expert-{layer}-{index}.shard"),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl ShardRecord {
    /// The deterministic encoding ([`encode_shard`]): what a shard file holds and what a manifest hashes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_shard(self)
    }
}

/// Serializes a record (see the module doc for the layout).
pub fn encode_shard(rec: &ShardRecord) -> Vec<u8> {
    let p = rec.params.len();
    let r = rec.router_bias.len();
    let mut out = Vec::with_capacity(HEADER_BYTES + 4 * (3 * p + r) + 8);
    out.extend_from_slice(&SHARD_MAGIC);
    out.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    let (kind, layer, index) = match rec.shard {
        ShardId::Trunk => (0u32, 0u32, 0u32),
        ShardId::Expert { layer, index } => (1, layer as u32, index as u32),
    };
    for x in [kind, layer, index] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&rec.step.to_le_bytes());
    out.extend_from_slice(&(p as u64).to_le_bytes());
    out.extend_from_slice(&(r as u64).to_le_bytes());
    for v in [&rec.params, &rec.opt_m, &rec.opt_v, &rec.router_bias] {
        for x in v.iter() {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Parses and validates a shard file's bytes: the shard must be `expected`, with `params_len` parameters
/// and `bias_len` router biases. `path` only labels errors.
pub fn decode_shard(
    bytes: &[u8],
    path: &Path,
    expected: ShardId,
    params_len: usize,
    bias_len: usize,
) -> Result<ShardRecord, CheckpointError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < HEADER_BYTES + 8 || bytes[..8] != SHARD_MAGIC {
        return Err(CheckpointError::BadMagic { path: path_buf() });
    }
    let version = u32_at(bytes, 8);
    if version != SHARD_VERSION {
        return Err(CheckpointError::UnsupportedVersion {
            path: path_buf(),
            version,
        });
    }
    let (kind, layer, index) = (u32_at(bytes, 12), u32_at(bytes, 16), u32_at(bytes, 20));
    let found = match kind {
        0 if layer == 0 && index == 0 => Some(ShardId::Trunk),
        1 => ShardId::expert(layer, index).ok(),
        _ => None,
    };
    if found != Some(expected) {
        let found = found
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("<kind {kind}>"));
        return Err(CheckpointError::WrongShard {
            path: path_buf(),
            expected,
            found,
        });
    }
    let step = u64_at(bytes, 24);
    let (p, r) = (u64_at(bytes, 32), u64_at(bytes, 40));
    if p != params_len as u64 {
        return Err(CheckpointError::Size {
            path: path_buf(),
            what: "parameter count",
            expected: params_len as u64,
            actual: p,
        });
    }
    if r != bias_len as u64 {
        return Err(CheckpointError::Size {
            path: path_buf(),
            what: "router-bias count",
            expected: bias_len as u64,
            actual: r,
        });
    }
    // Both counts now equal in-memory sizes, so this arithmetic cannot overflow.
    let (p, r) = (params_len, bias_len);
    let total = HEADER_BYTES + 4 * (3 * p + r) + 8;
    if bytes.len() != total {
        return Err(CheckpointError::Size {
            path: path_buf(),
            what: "file length",
            expected: total as u64,
            actual: bytes.len() as u64,
        });
    }
    if fnv1a(&bytes[..total - 8]) != u64_at(bytes, total - 8) {
        return Err(CheckpointError::Checksum { path: path_buf() });
    }
    let mut at = HEADER_BYTES;
    let mut take = |len: usize| {
        let v = f32s(&bytes[at..at + 4 * len]);
        at += 4 * len;
        v
    };
    let params = take(p);
    let opt_m = take(p);
    let opt_v = take(p);
    let router_bias = take(r);
    Ok(ShardRecord {
        shard: expected,
        step,
        params,
        opt_m,
        opt_v,
        router_bias,
    })
}

/// Writes a shard file atomically (temporary file, then rename).
pub fn write_shard(path: &Path, rec: &ShardRecord) -> Result<(), CheckpointError> {
    write_atomic(path, &encode_shard(rec))
}

/// Reads and validates a shard file (see [`decode_shard`]). The file's length is checked against the
/// expected sizes before it is read, so a huge foreign file is not loaded.
pub fn read_shard(
    path: &Path,
    expected: ShardId,
    params_len: usize,
    bias_len: usize,
) -> Result<ShardRecord, CheckpointError> {
    let io_err = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io_err)?.len();
    let total = (HEADER_BYTES + 4 * (3 * params_len + bias_len) + 8) as u64;
    if len != total {
        return Err(CheckpointError::Size {
            path: path.to_path_buf(),
            what: "file length",
            expected: total,
            actual: len,
        });
    }
    let bytes = fs::read(path).map_err(io_err)?;
    decode_shard(&bytes, path, expected, params_len, bias_len)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a crash never
/// leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| CheckpointError::Io { path: p, source }
    };
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a small text file (at most [`MAX_TEXT_BYTES`]).
pub fn read_text(path: &Path) -> Result<String, CheckpointError> {
    let io_err = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io_err)?.len();
    if len > MAX_TEXT_BYTES {
        return Err(CheckpointError::Size {
            path: path.to_path_buf(),
            what: "text file length",
            expected: MAX_TEXT_BYTES,
            actual: len,
        });
    }
    fs::read_to_string(path).map_err(io_err)
}
