//! CIFAR-10 in the official binary layout (`cifar-10-batches-bin`): `data_batch_1..5.bin`
//! and `test_batch.bin`, each record one label byte then 1024 R, 1024 G, 1024 B bytes
//! (row-major 32×32), and `batches.meta.txt` with the class names.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::{ImageSet, RawSplits};

pub const FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];
const RECORD: usize = 1 + 3 * 32 * 32;
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The folder holding the batches: `DATA_DIR/cifar-10-batches-bin`, or `DATA_DIR` itself.
pub fn find(data_dir: Option<&Path>) -> Result<PathBuf> {
    let Some(root) = data_dir else {
        bail!(
            "dataset cifar10 needs a data directory: pass --data-dir DIR (or set IEU_DATA_DIR) \
             where DIR/cifar-10-batches-bin/ holds the official binary files ({})",
            FILES.join(", ")
        );
    };
    for cand in [root.join("cifar-10-batches-bin"), root.to_path_buf()] {
        if cand.join(FILES[0]).is_file() {
            let missing: Vec<_> = FILES.iter().filter(|f| !cand.join(f).is_file()).collect();
            if !missing.is_empty() {
                bail!(
                    "CIFAR-10 in {} is incomplete: missing {}",
                    cand.display(),
                    missing
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            return Ok(cand);
        }
    }
    bail!(
        "CIFAR-10 not found: expected {}/cifar-10-batches-bin/ with the official binary files ({})",
        root.display(),
        FILES.join(", ")
    )
}

/// blake3 over the six batch files, in order.
pub fn digest(dir: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for f in FILES {
        let d = crate::store::stat_cache::digest(&dir.join(f))?;
        h.update(f.as_bytes());
        h.update(d.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Records in each official batch file.
pub const RECORDS_PER_BATCH: usize = 10_000;

fn read_batch(path: &Path, into: &mut ImageSet, records: usize) -> Result<()> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    // The official layout: 10 000 records per batch file; a file cut short on a record
    // boundary must not silently shrink the dataset.
    if bytes.len() != records * RECORD {
        bail!(
            "{} is not an official CIFAR-10 batch: {} bytes ({} records{}), expected {} bytes ({records} records of {RECORD} bytes); the file is truncated or damaged",
            path.display(),
            bytes.len(),
            bytes.len() / RECORD,
            if bytes.len() % RECORD == 0 {
                ""
            } else {
                " and a partial one"
            },
            records * RECORD
        );
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            bail!(
                "{}: record {i} has label {} (expected 0..9)",
                path.display(),
                rec[0]
            );
        }
        into.push(&rec[1..], rec[0] as u16);
    }
    Ok(())
}

/// The samples of the `dataset` step (the root of its code identity, `dataset/cifar10`).
pub fn source(dir: &Path) -> Result<super::Source> {
    Ok(super::Source::Memory(load(dir)?))
}

pub fn load(dir: &Path) -> Result<RawSplits> {
    load_records(dir, RECORDS_PER_BATCH)
}

/// [`load`] with `records` records expected in every batch file.
fn load_records(dir: &Path, records: usize) -> Result<RawSplits> {
    let mut train = ImageSet::new(32);
    for f in &FILES[..5] {
        read_batch(&dir.join(f), &mut train, records)?;
    }
    let mut test = ImageSet::new(32);
    read_batch(&dir.join(FILES[5]), &mut test, records)?;
    let classes = match std::fs::read_to_string(dir.join("batches.meta.txt")) {
        Ok(t) => {
            let names: Vec<String> = t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() == 10 {
                names
            } else {
                CLASSES.iter().map(|s| s.to_string()).collect()
            }
        }
        Err(_) => CLASSES.iter().map(|s| s.to_string()).collect(),
    };
    Ok(RawSplits {
        train,
        test,
        classes,
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2023, 0.1994, 0.2010],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = find(Some(dir.path())).unwrap_err().to_string();
        assert!(
            e.contains("CIFAR-10 not found") && e.contains("data_batch_1.bin"),
            "{e}"
        );
        let b = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("data_batch_1.bin"), [0u8; 10]).unwrap();
        let e = find(Some(dir.path())).unwrap_err().to_string();
        assert!(
            e.contains("incomplete") && e.contains("test_batch.bin"),
            "{e}"
        );
        for f in FILES {
            std::fs::write(b.join(f), [0u8; 10]).unwrap();
        }
        let found = find(Some(dir.path())).unwrap();
        let e = load(&found).err().unwrap().to_string();
        assert!(e.contains("not an official CIFAR-10 batch"), "{e}");
    }

    #[test]
    fn reads_records_in_official_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = vec![0u8; RECORD];
        rec[0] = 7;
        rec[1] = 200; // R of pixel (0,0)
        rec[1 + 1024] = 100; // G of pixel (0,0)
        for f in FILES {
            std::fs::write(dir.path().join(f), &rec).unwrap();
        }
        let raw = load_records(dir.path(), 1).unwrap();
        assert_eq!(raw.train.len(), 5);
        // Cut short on a record boundary: an error, not a smaller dataset.
        let e = load_records(dir.path(), 2).err().unwrap().to_string();
        assert!(
            e.contains("truncated") && e.contains("data_batch_1.bin"),
            "{e}"
        );
        assert_eq!(raw.train.labels[0], 7);
        assert_eq!(raw.train.image(0)[0], 200);
        assert_eq!(raw.train.image(0)[1024], 100);
    }
}
