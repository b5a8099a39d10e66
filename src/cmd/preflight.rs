//! Checks a command makes before it does any work, so that a setting that cannot work fails at start-up with
//! one line naming it, not after hours of training (an unwritable `--metrics` used to end a coordinator
//! after it had committed round 101; an unwritable `--export`, at the end of the run).

use std::fs::{self, OpenOptions};
use std::path::Path;

use anyhow::Context;

/// `path` (a file appended to, such as `--metrics`) can be created or appended to. The file is created if
/// missing (with its parent directories); nothing in it changes.
pub fn appendable_file(setting: &str, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| {
            format!("{setting} {}: cannot create its directory", path.display())
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{setting} {}: cannot write to it", path.display()))?;
    Ok(())
}

/// `dir` (a directory written later, such as `--export`) exists or can be created, and a file can be written
/// in it. The probe file is removed again.
pub fn writable_dir(setting: &str, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("{setting} {}: cannot create it", dir.display()))?;
    let probe = dir.join(format!(".mana-write-check-{}", std::process::id()));
    fs::write(&probe, b"")
        .with_context(|| format!("{setting} {}: cannot write in it", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_paths_pass_and_others_name_their_setting() {
        let dir = tempfile::tempdir().expect("temp dir");
        appendable_file("--metrics", &dir.path().join("a/b/metrics.jsonl")).expect("created");
        writable_dir("--export", &dir.path().join("export")).expect("created");
        assert_eq!(
            fs::read_dir(dir.path().join("export"))
                .expect("read")
                .count(),
            0,
            "probe removed"
        );
        // A path under a regular file can never be created.
        let file = dir.path().join("file");
        fs::write(&file, b"x").expect("write");
        let err = appendable_file("--metrics", &file.join("m.jsonl")).expect_err("under a file");
        assert!(err.to_string().starts_with("--metrics "), "{err}");
        let err = writable_dir("--export", &file.join("out")).expect_err("under a file");
        assert!(err.to_string().starts_with("--export "), "{err}");
    }
}
