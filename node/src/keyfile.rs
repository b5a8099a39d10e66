//! The node's key file: where its ed25519 identity (signing key and libp2p PeerId) lives on disk.
//!
//! Format: two lines of text, `mana-ed25519-secret-v1` then the 32-byte secret seed in 64 lowercase hex
//! digits. The file is created with mode 0600 (never briefly wider: the mode is set at creation), and a
//! key file that the group or others can read or write is refused rather than used, since anyone who can
//! read it can sign as this node.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use mana_protocol::Keypair;
use thiserror::Error;

/// First line of a key file.
pub const KEY_FILE_HEADER: &str = "mana-ed25519-secret-v1";

/// Largest key file read; a real one is under 100 bytes, so anything bigger is not a key file.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why a key file could not be created or loaded.
#[derive(Debug, Error)]
pub enum KeyFileError {
    /// Reading, writing or inspecting the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not exist and creating a new identity there was not asked for: a typo in a key path, or
    /// a key lost from a data directory that already holds a store, must not quietly become a new identity
    /// (for a coordinator, a new trust root every node would refuse).
    #[error(
        "key file {path} does not exist; a new key there would be a new identity. Check the path, or create one with `mana keygen --out {path}` or by passing --new-key"
    )]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file exists and overwriting was not asked for.
    #[error("key file {path} already exists (pass --force to replace it)")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// The group or others may access the file.
    #[error(
        "key file {path} has mode {mode:04o}; it must not be accessible to group or others (run `chmod 600 {path}`)"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key file.
    #[error("key file {path} is not a mana key file: {reason}")]
    BadFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No randomness to generate a key.
    #[error("cannot generate a key: {0}")]
    Generate(mana_protocol::ProtocolError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The text of a key file holding `keypair`.
fn render(keypair: &Keypair) -> String {
    format!("{KEY_FILE_HEADER}\n{}\n", hex_encode(&keypair.seed()))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the text of a key file.
fn parse(path: &Path, text: &str) -> Result<Keypair, KeyFileError> {
    let bad = |reason: &str| KeyFileError::BadFormat {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(KEY_FILE_HEADER) {
        return Err(bad(&format!("the first line is not `{KEY_FILE_HEADER}`")));
    }
    let hex_line = lines
        .next()
        .ok_or_else(|| bad("the key line is missing"))?
        .trim();
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(bad("unexpected lines after the key"));
    }
    if hex_line.len() != 64 || !hex_line.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("the key line is not 64 hex digits"));
    }
    let mut seed = [0u8; 32];
    for (i, slot) in seed.iter_mut().enumerate() {
        *slot = u8::from_str_radix(&hex_line[2 * i..2 * i + 2], 16)
            .map_err(|_| bad("the key line is not hex"))?;
    }
    Ok(Keypair::from_seed(&seed))
}

/// Generates a fresh key and writes it to `path` with mode 0600. Refuses to replace an existing file
/// unless `force`; a forced replacement writes a temporary file beside it and renames it over, so the
/// old key is never half-overwritten.
pub fn generate(path: &Path, force: bool) -> Result<Keypair, KeyFileError> {
    let keypair = Keypair::generate().map_err(KeyFileError::Generate)?;
    write(path, &keypair, force)?;
    Ok(keypair)
}

/// Writes `keypair` to `path` with mode 0600 (see [`generate`] for `force`).
pub fn write(path: &Path, keypair: &Keypair, force: bool) -> Result<(), KeyFileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    if !force {
        return write_new(path, keypair).map_err(|e| match e {
            KeyFileError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                KeyFileError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            }
            other => other,
        });
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover temporary file from a crash would block create_new; it holds no key we need.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
        _ => {}
    }
    write_new(&tmp, keypair)?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Creates `path` (which must not exist) with mode 0600 and writes the key, synced to disk.
fn write_new(path: &Path, keypair: &Keypair) -> Result<(), KeyFileError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(render(keypair).as_bytes())
        .map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Loads the key from `path`, refusing files that group or others may access and files not in the format.
pub fn load(path: &Path) -> Result<Keypair, KeyFileError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(KeyFileError::BadFormat {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::BadFormat {
            path: path.to_path_buf(),
            reason: format!("{} bytes is too big", meta.len()),
        });
    }
    let bytes = fs::read(path).map_err(io(path))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| KeyFileError::BadFormat {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })?;
    parse(path, text)
}

/// Loads the key at `path`, or generates one there if the file does not exist.
pub fn load_or_generate(path: &Path) -> Result<Keypair, KeyFileError> {
    load_or_create(path, true)
}

/// Loads the key at `path`; if the file does not exist, generates one there when `may_create`, else
/// [`KeyFileError::Missing`].
pub fn load_or_create(path: &Path, may_create: bool) -> Result<Keypair, KeyFileError> {
    match fs::metadata(path) {
        Ok(_) => load(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => generate(path, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KeyFileError::Missing {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A fresh empty directory under the system temp dir, removed on drop (std only, so these tests need
    /// no extra dev-dependency).
    struct TempDir(PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "mana-keyfile-test-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    #[test]
    fn generate_then_load_gives_the_same_key() {
        let dir = tempdir();
        let path = dir.path().join("sub/node.key");
        let kp = generate(&path, false).unwrap();
        assert_eq!(load(&path).unwrap().peer_id(), kp.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn a_missing_file_is_created_only_when_allowed() {
        let dir = tempdir();
        let path = dir.path().join("node.key");
        let err = load_or_create(&path, false).unwrap_err();
        assert!(matches!(err, KeyFileError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("--new-key"), "{err}");
        assert!(!path.exists(), "nothing created");
        let created = load_or_create(&path, true).unwrap();
        assert_eq!(
            load_or_create(&path, false).unwrap().public(),
            created.public()
        );
    }

    #[test]
    fn existing_file_needs_force() {
        let dir = tempdir();
        let path = dir.path().join("node.key");
        let first = generate(&path, false).unwrap();
        assert!(matches!(
            generate(&path, false),
            Err(KeyFileError::AlreadyExists { .. })
        ));
        assert_eq!(
            load(&path).unwrap().public(),
            first.public(),
            "a refused overwrite must keep the key"
        );
        let second = generate(&path, true).unwrap();
        assert_eq!(load(&path).unwrap().public(), second.public());
        assert_ne!(first.public(), second.public());
    }

    #[cfg(unix)]
    #[test]
    fn group_or_world_readable_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let path = dir.path().join("node.key");
        generate(&path, false).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o666, 0o610] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match load(&path) {
                Err(KeyFileError::InsecurePermissions { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: expected InsecurePermissions, got {other:?}"),
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load(&path).is_ok());
    }

    #[test]
    fn bad_formats_are_refused() {
        let dir = tempdir();
        let path = dir.path().join("node.key");
        let good = "ab".repeat(32);
        for text in [
            String::new(),
            "hello\n".to_string(),
            format!("{KEY_FILE_HEADER}\n"),
            format!("{KEY_FILE_HEADER}\n{}\n", &good[..62]),
            format!("{KEY_FILE_HEADER}\n{}zz\n", &good[..62]),
            format!("{KEY_FILE_HEADER}\n{good}\nextra\n"),
            format!("mana-ed25519-secret-v2\n{good}\n"),
        ] {
            let _ = fs::remove_file(&path);
            write_text(&path, text.as_bytes());
            assert!(
                matches!(load(&path), Err(KeyFileError::BadFormat { .. })),
                "{text:?} should be refused"
            );
        }
        let _ = fs::remove_file(&path);
        write_text(&path, &[0xff, 0xfe, 0x00]);
        assert!(matches!(load(&path), Err(KeyFileError::BadFormat { .. })));
        let _ = fs::remove_file(&path);
        write_text(&path, format!("{KEY_FILE_HEADER}\n{good}\n").as_bytes());
        assert!(load(&path).is_ok());
        assert!(matches!(
            load(&dir.path().join("missing")),
            Err(KeyFileError::Io { .. })
        ));
    }

    fn write_text(path: &Path, bytes: &[u8]) {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        options.open(path).unwrap().write_all(bytes).unwrap();
    }
}
