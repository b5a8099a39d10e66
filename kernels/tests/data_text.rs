//! The byte-level dataset: the split, batch shapes, determinism in (seed, shard, step), validation batches
//! and refusals of bad shapes.

use mana_kernels::data::{Batch, DatasetError, Split, TextDataset};

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i * 7 % 26) as u8).collect()
}

#[test]
fn split_interleaves_blocks_and_keeps_every_byte() {
    let t = text(100_000);
    let split = Split {
        block_bytes: 1000,
        validation_fraction: 0.1,
    };
    let ds = TextDataset::new(&t, split).expect("valid split");
    assert_eq!(
        ds.train_bytes().len() + ds.validation_bytes().len(),
        t.len()
    );
    assert_eq!(ds.validation_bytes().len(), 10_000, "10% of 100 blocks");
    // Validation blocks are spread out: the first validation block is block 9, not one at the end.
    assert_eq!(&ds.validation_bytes()[..1000], &t[9000..10_000]);
    assert_eq!(&ds.validation_bytes()[1000..2000], &t[19_000..20_000]);
    assert_eq!(&ds.train_bytes()[..9000], &t[..9000]);
}

#[test]
fn a_short_text_still_gets_a_validation_part() {
    let t = text(17_000);
    let ds = TextDataset::new(
        &t,
        Split {
            block_bytes: 4096,
            validation_fraction: 0.05,
        },
    )
    .expect("valid split");
    assert!(
        ds.validation_bytes().len() >= 800,
        "validation holds {} bytes",
        ds.validation_bytes().len()
    );
    assert_eq!(
        ds.train_bytes().len() + ds.validation_bytes().len(),
        t.len()
    );
    assert!(ds.validation_batch(0, 2, 16).is_ok());
}

#[test]
fn zero_validation_fraction_keeps_everything_for_training() {
    let t = text(5000);
    let ds = TextDataset::new(
        &t,
        Split {
            block_bytes: 64,
            validation_fraction: 0.0,
        },
    )
    .expect("valid split");
    assert_eq!(ds.train_bytes(), &t[..]);
    assert!(ds.validation_bytes().is_empty());
    assert!(matches!(
        ds.validation_batch(0, 2, 8),
        Err(DatasetError::TooShort {
            part: "validation",
            ..
        })
    ));
}

#[test]
fn batch_rows_are_consecutive_training_bytes() {
    let t = text(50_000);
    let ds = TextDataset::new(&t, Split::default()).expect("valid split");
    let b = ds.batch(1, 0, 0, 4, 32).expect("batch");
    assert_eq!((b.batch_size, b.seq_len, b.tokens.len()), (4, 32, 4 * 33));
    let train = ds.train_bytes();
    for row in b.rows() {
        let bytes: Vec<u8> = row
            .iter()
            .map(|&x| u8::try_from(x).expect("byte tokens are below 256"))
            .collect();
        assert!(
            train.windows(33).any(|w| w == &bytes[..]),
            "row is not a window of the training bytes"
        );
    }
}

#[test]
fn batches_are_deterministic_in_seed_shard_and_step() {
    let t = text(200_000);
    let ds = TextDataset::new(&t, Split::default()).expect("valid split");
    let get = |seed, shard, step| ds.batch(seed, shard, step, 8, 64).expect("batch");
    let base = get(7, 3, 100);
    assert_eq!(base, get(7, 3, 100), "same arguments, same batch");
    // A second dataset built from the same text gives the same batch too.
    let again = TextDataset::new(&t, Split::default()).expect("valid split");
    assert_eq!(base, again.batch(7, 3, 100, 8, 64).expect("batch"));
    assert_ne!(base, get(8, 3, 100), "seed changes the batch");
    assert_ne!(base, get(7, 4, 100), "shard changes the batch");
    assert_ne!(base, get(7, 3, 101), "step changes the batch");
}

#[test]
fn batch_starts_cover_the_training_bytes() {
    // Offsets are drawn uniformly: over many batches, rows start in every tenth of the training bytes.
    // Pseudo-random bytes, so that a window of 9 tells its position.
    let mut x = 1u64;
    let t: Vec<u8> = (0..10_000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    let ds = TextDataset::new(
        &t,
        Split {
            block_bytes: 1000,
            validation_fraction: 0.0,
        },
    )
    .expect("valid split");
    let mut seen = [0usize; 10];
    for step in 0..200 {
        let b = ds.batch(0, 0, step, 4, 8).expect("batch");
        for row in b.rows() {
            let pos = ds
                .train_bytes()
                .windows(9)
                .position(|w| w.iter().zip(row).all(|(&a, &b)| u32::from(a) == b));
            let pos = pos.expect("row is a window of the training bytes");
            seen[pos * 10 / ds.train_bytes().len()] += 1;
        }
    }
    assert!(
        seen.iter().all(|&n| n > 40),
        "start offsets are not spread out: {seen:?}"
    );
}

#[test]
fn validation_batches_are_fixed_non_overlapping_windows() {
    let t = text(100_000);
    let ds = TextDataset::new(
        &t,
        Split {
            block_bytes: 512,
            validation_fraction: 0.2,
        },
    )
    .expect("valid split");
    let v0 = ds.validation_batch(0, 4, 15).expect("validation batch");
    assert_eq!(v0, ds.validation_batch(0, 4, 15).expect("validation batch"));
    let val = ds.validation_bytes();
    for (r, row) in v0.rows().enumerate() {
        let want: Vec<u32> = val[r * 16..(r + 1) * 16]
            .iter()
            .map(|&b| u32::from(b))
            .collect();
        assert_eq!(row, &want[..]);
    }
    let v1 = ds.validation_batch(1, 4, 15).expect("validation batch");
    let want: Vec<u32> = val[64..80].iter().map(|&b| u32::from(b)).collect();
    assert_eq!(v1.row(0), Some(&want[..]));
    // Indices past the end wrap around.
    let windows = ds.validation_windows(15) as u64;
    assert_eq!(windows, val.len() as u64 / 16);
    let wrapped = ds
        .validation_batch(windows, 1, 15)
        .expect("validation batch");
    assert_eq!(wrapped.row(0), v0.row(0));
}

#[test]
fn bad_inputs_are_refused_with_typed_errors() {
    assert_eq!(
        TextDataset::new(b"", Split::default()).err(),
        Some(DatasetError::Empty)
    );
    let bad_fraction = TextDataset::new(
        b"abc",
        Split {
            block_bytes: 4,
            validation_fraction: 0.9,
        },
    );
    assert!(matches!(bad_fraction, Err(DatasetError::InvalidSplit(_))));
    let bad_block = TextDataset::new(
        b"abc",
        Split {
            block_bytes: 0,
            validation_fraction: 0.0,
        },
    );
    assert!(matches!(bad_block, Err(DatasetError::InvalidSplit(_))));
    let ds = TextDataset::new(
        &text(1000),
        Split {
            block_bytes: 100,
            validation_fraction: 0.1,
        },
    )
    .expect("valid split");
    assert!(matches!(
        ds.batch(0, 0, 0, 0, 8),
        Err(DatasetError::InvalidShape { .. })
    ));
    assert!(matches!(
        ds.batch(0, 0, 0, 2, 0),
        Err(DatasetError::InvalidShape { .. })
    ));
    assert!(matches!(
        ds.batch(0, 0, 0, usize::MAX, 8),
        Err(DatasetError::InvalidShape { .. })
    ));
    assert!(matches!(
        ds.batch(0, 0, 0, 1, usize::MAX),
        Err(DatasetError::InvalidShape { .. })
    ));
    assert!(matches!(
        ds.batch(0, 0, 0, 1, 900),
        Err(DatasetError::TooShort {
            part: "training",
            ..
        })
    ));
    // Exactly as long as one row is enough.
    assert!(ds.batch(0, 0, 0, 1, 899).is_ok());
}

#[test]
fn batch_new_checks_its_shape() {
    assert!(Batch::new(vec![0; 6], 2, 2).is_ok());
    assert!(Batch::new(vec![0; 5], 2, 2).is_err());
    assert!(Batch::new(vec![], usize::MAX, usize::MAX).is_err());
    let b = Batch::new((0..6).collect(), 2, 2).expect("shape fits");
    assert_eq!(b.row(1), Some(&[3, 4, 5][..]));
    assert_eq!(b.row(2), None);
    assert_eq!(b.predicted_tokens(), 4);
}
