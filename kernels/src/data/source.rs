//! Reading a user's corpus from disk: one UTF-8 text file, a gzip-compressed one (`.gz`), or a directory
//! of them searched recursively. Everything read is untrusted, so sizes are bounded before bytes are kept
//! and every failure is a typed [`SourceError`] that names the file.
//!
//! Files of a directory are read in sorted path order (so the same tree always gives the same bytes),
//! hidden entries (names starting with '.') are skipped, and symbolic links to directories are not followed
//! (no loops). Consecutive files are joined with a newline when the first does not end with one.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Bounds on what a corpus may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// The most bytes of (decompressed) text kept in memory.
    pub max_bytes: u64,
    /// The most files a directory may contribute.
    pub max_files: usize,
    /// The deepest directory nesting followed.
    pub max_depth: usize,
}

impl Default for SourceLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_files: 100_000,
            max_depth: 32,
        }
    }
}

/// Why a corpus could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file or directory could not be opened or read (or a gzip stream is corrupt).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's (or the decoder's) error.
        source: io::Error,
    },
    /// A file is not valid UTF-8.
    #[error("{path} is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first invalid byte in the (decompressed) file.
        offset: usize,
    },
    /// The path, or every file under it, holds no bytes.
    #[error("{path} holds no text")]
    Empty {
        /// The file or directory.
        path: PathBuf,
    },
    /// The text exceeds [`SourceLimits::max_bytes`].
    #[error("the corpus exceeds the limit of {limit} bytes (at {path})")]
    TooLarge {
        /// The file being read when the limit was passed.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A directory holds more files than [`SourceLimits::max_files`].
    #[error("{path} holds more than {limit} files")]
    TooManyFiles {
        /// The directory.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// The path is neither a regular file nor a directory.
    #[error("{path} is neither a file nor a directory")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
}

/// Reads the corpus at `path` (a file, a `.gz` file, or a directory of them) into one byte string of
/// UTF-8 text.
pub fn read_corpus(path: &Path, limits: SourceLimits) -> Result<Vec<u8>, SourceError> {
    let meta = std::fs::metadata(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    if meta.is_dir() {
        collect_files(path, 0, limits, &mut files)?;
        files.sort();
    } else if meta.is_file() {
        files.push(path.to_path_buf());
    } else {
        return Err(SourceError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut text = Vec::new();
    for file in &files {
        let before = text.len();
        if before > 0 && text.last() != Some(&b'\n') {
            text.push(b'\n');
        }
        let start = text.len();
        read_file_into(file, limits.max_bytes, &mut text)?;
        if let Err(e) = std::str::from_utf8(&text[start..]) {
            return Err(SourceError::NotUtf8 {
                path: file.clone(),
                offset: e.valid_up_to(),
            });
        }
        if text.len() == start {
            text.truncate(before);
        }
    }
    if text.is_empty() {
        return Err(SourceError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Appends the regular files under `dir` (not sorted) to `out`.
fn collect_files(
    dir: &Path,
    depth: usize,
    limits: SourceLimits,
    out: &mut Vec<PathBuf>,
) -> Result<(), SourceError> {
    if depth > limits.max_depth {
        return Ok(());
    }
    let io_err = |source| SourceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // file_type() does not follow links: a link to a directory is skipped, a link to a file is read.
        let kind = entry.file_type().map_err(|source| SourceError::Io {
            path: path.clone(),
            source,
        })?;
        if kind.is_dir() {
            collect_files(&path, depth + 1, limits, out)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            if out.len() >= limits.max_files {
                return Err(SourceError::TooManyFiles {
                    path: dir.to_path_buf(),
                    limit: limits.max_files,
                });
            }
            out.push(path);
        }
    }
    Ok(())
}

/// Appends the (decompressed, for `.gz`) bytes of `path` to `text`, refusing to grow it past `max_bytes`.
fn read_file_into(path: &Path, max_bytes: u64, text: &mut Vec<u8>) -> Result<(), SourceError> {
    let io_err = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let room = max_bytes.saturating_sub(text.len() as u64);
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let reader: Box<dyn Read> = if gz {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    // Read one byte past the room left, to tell "exactly full" from "too large" without trusting sizes
    // that the file (or a gzip header) claims.
    let read = reader
        .take(room.saturating_add(1))
        .read_to_end(text)
        .map_err(io_err)?;
    if read as u64 > room {
        return Err(SourceError::TooLarge {
            path: path.to_path_buf(),
            limit: max_bytes,
        });
    }
    Ok(())
}
