//! Reading a corpus from disk: files, .gz files, directories (recursively, in sorted order), and typed
//! errors for missing, non-UTF-8, empty and oversized input.

use std::fs;
use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use mana_kernels::data::{SourceError, SourceLimits, read_corpus};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).expect("writing to a Vec cannot fail");
    e.finish().expect("writing to a Vec cannot fail")
}

#[test]
fn reads_a_plain_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("a.txt");
    fs::write(&p, "héllo wörld\n").expect("write");
    assert_eq!(
        read_corpus(&p, SourceLimits::default()).expect("read"),
        "héllo wörld\n".as_bytes()
    );
}

#[test]
fn reads_a_gz_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("a.txt.gz");
    let text = "in the beginning\n".repeat(1000);
    fs::write(&p, gz(text.as_bytes())).expect("write");
    assert_eq!(
        read_corpus(&p, SourceLimits::default()).expect("read"),
        text.as_bytes()
    );
}

#[test]
fn reads_a_directory_recursively_in_sorted_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    fs::create_dir_all(root.join("b/c")).expect("mkdir");
    fs::write(root.join("z.txt"), "zed").expect("write");
    fs::write(root.join("a.txt"), "alpha\n").expect("write");
    fs::write(root.join("b/c/deep.txt.gz"), gz(b"deep")).expect("write");
    fs::write(root.join("b/empty.txt"), "").expect("write");
    fs::write(root.join(".hidden"), [0xFFu8, 0xFE]).expect("write");
    let text = read_corpus(root, SourceLimits::default()).expect("read");
    assert_eq!(String::from_utf8(text).expect("utf8"), "alpha\ndeep\nzed");
}

#[test]
fn missing_path_is_an_io_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = read_corpus(&dir.path().join("nope"), SourceLimits::default()).expect_err("missing");
    assert!(matches!(err, SourceError::Io { .. }), "{err}");
}

#[test]
fn non_utf8_is_refused_with_the_offset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("bin.dat");
    fs::write(&p, [b'o', b'k', 0xC3, 0x28]).expect("write");
    let err = read_corpus(&p, SourceLimits::default()).expect_err("not UTF-8");
    assert!(
        matches!(err, SourceError::NotUtf8 { offset: 2, .. }),
        "{err}"
    );
    // The same inside a directory names the file.
    fs::write(dir.path().join("good.txt"), "fine").expect("write");
    let err = read_corpus(dir.path(), SourceLimits::default()).expect_err("not UTF-8");
    assert!(err.to_string().contains("bin.dat"), "{err}");
}

#[test]
fn empty_inputs_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = read_corpus(dir.path(), SourceLimits::default()).expect_err("empty dir");
    assert!(matches!(err, SourceError::Empty { .. }), "{err}");
    let p = dir.path().join("empty.txt");
    fs::write(&p, "").expect("write");
    assert!(matches!(
        read_corpus(&p, SourceLimits::default()),
        Err(SourceError::Empty { .. })
    ));
    let g = dir.path().join("empty.gz");
    fs::write(&g, gz(b"")).expect("write");
    assert!(matches!(
        read_corpus(&g, SourceLimits::default()),
        Err(SourceError::Empty { .. })
    ));
}

#[test]
fn corrupt_gzip_is_an_io_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("bad.gz");
    let mut bytes = gz(b"some text that compresses");
    bytes.truncate(bytes.len() / 2);
    fs::write(&p, bytes).expect("write");
    assert!(matches!(
        read_corpus(&p, SourceLimits::default()),
        Err(SourceError::Io { .. })
    ));
    fs::write(&p, b"not gzip at all").expect("write");
    assert!(matches!(
        read_corpus(&p, SourceLimits::default()),
        Err(SourceError::Io { .. })
    ));
}

#[test]
fn size_and_file_count_limits_hold() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("big.txt");
    fs::write(&p, "x".repeat(1000)).expect("write");
    let limits = SourceLimits {
        max_bytes: 999,
        ..SourceLimits::default()
    };
    assert!(matches!(
        read_corpus(&p, limits),
        Err(SourceError::TooLarge { limit: 999, .. })
    ));
    let limits = SourceLimits {
        max_bytes: 1000,
        ..SourceLimits::default()
    };
    assert_eq!(
        read_corpus(&p, limits).expect("exactly at the limit").len(),
        1000
    );
    // A gzip bomb stops at the limit instead of filling memory.
    let bomb = dir.path().join("bomb.gz");
    fs::write(&bomb, gz(&vec![b'a'; 10 << 20])).expect("write");
    let limits = SourceLimits {
        max_bytes: 1 << 20,
        ..SourceLimits::default()
    };
    assert!(matches!(
        read_corpus(&bomb, limits),
        Err(SourceError::TooLarge { .. })
    ));
    let many = dir.path().join("many");
    fs::create_dir(&many).expect("mkdir");
    for i in 0..5 {
        fs::write(many.join(format!("{i}.txt")), "t").expect("write");
    }
    let limits = SourceLimits {
        max_files: 4,
        ..SourceLimits::default()
    };
    assert!(matches!(
        read_corpus(&many, limits),
        Err(SourceError::TooManyFiles { .. })
    ));
}
