//! Digests of input files (datasets, trigger files, checkpoints) remembered by their
//! metadata, so planning does not re-read files that have not changed.
//!
//! A dataset step's key hashes the content of every file it reads; hashing GTSRB and
//! Tiny-ImageNet (~170,000 files) at every `run` would dominate a fully cached re-run. The
//! cache (`<store>/cache/file-digests.json`) maps a file's absolute path to its size,
//! modification and status-change times (nanoseconds), inode and device, and its blake3
//! digest; a file whose metadata still matches is not read again. Any write to a file
//! changes its status-change time (which, unlike the modification time, cannot be set back
//! by a user), so a changed file is always re-hashed. Files modified in the two seconds
//! before they were hashed are not remembered (their time stamp may not yet tell a later
//! write apart). The cache is only an optimisation: a missing or unreadable cache file
//! means hashing everything, and concurrent runs may overwrite each other's saves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use anyhow::Result;
use serde::{Deserialize, Serialize};

const FILE: &str = "file-digests.json";

/// size, mtime (s, ns), ctime (s, ns), inode, device.
type Stamp = (u64, i64, i64, i64, i64, u64, u64);

#[derive(Default, Serialize, Deserialize)]
struct Cache {
    version: u32,
    /// Absolute path (as text: hashing `Path`s component by component is slow) -> digest.
    entries: HashMap<String, (Stamp, String)>,
}

struct State {
    path: Option<PathBuf>,
    cache: Cache,
    dirty: bool,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Files modified this recently (seconds) are hashed but not remembered.
static RECENT_S: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(2);

/// Uses the cache kept in the store at `store_root` (loaded now, saved by [`save`]).
pub fn attach(store_root: &Path) {
    let path = store_root.join("cache").join(FILE);
    let cache = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cache>(&b).ok())
        .filter(|c| c.version == 1)
        .unwrap_or(Cache {
            version: 1,
            entries: HashMap::new(),
        });
    *STATE.lock().unwrap() = Some(State {
        path: Some(path),
        cache,
        dirty: false,
    });
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.ino(),
            meta.dev(),
        )
    }
    #[cfg(not(unix))]
    {
        let m = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        (
            meta.len(),
            m.as_secs() as i64,
            m.subsec_nanos() as i64,
            0,
            0,
            0,
            0,
        )
    }
}

/// blake3 (hex) of a file's content, from the cache when its metadata is unchanged.
pub fn digest(path: &Path) -> Result<String> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = abs.to_string_lossy();
    let meta = std::fs::metadata(&abs)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let st = stamp(&meta);
    {
        let mut guard = STATE.lock().unwrap();
        if let Some(s) = guard.as_mut()
            && let Some((cached, d)) = s.cache.entries.get(text.as_ref())
            && *cached == st
        {
            return Ok(d.clone());
        }
    }
    let d = super::digest_file(&abs)?.blake3;
    let mut guard = STATE.lock().unwrap();
    if let Some(s) = guard.as_mut() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let recent = RECENT_S.load(std::sync::atomic::Ordering::Relaxed);
        if now - st.1 > recent && now - st.3 > recent {
            s.cache.entries.insert(text.into_owned(), (st, d.clone()));
            s.dirty = true;
        }
    }
    Ok(d)
}

/// Writes the cache back (atomically) if anything was added.
pub fn save() -> Result<()> {
    let mut guard = STATE.lock().unwrap();
    let Some(s) = guard.as_mut() else {
        return Ok(());
    };
    let Some(path) = s.path.clone() else {
        return Ok(());
    };
    if !s.dirty {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    super::write_atomic(&path, &serde_json::to_vec(&s.cache)?)?;
    s.dirty = false;
    Ok(())
}

/// Whether the cache holds a digest for `path` that its current metadata matches.
pub fn is_cached(path: &Path) -> bool {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(meta) = std::fs::metadata(&abs) else {
        return false;
    };
    STATE
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|s| {
            s.cache
                .entries
                .get(abs.to_string_lossy().as_ref())
                .map(|(st, _)| *st == stamp(&meta))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_are_not_reread_and_changed_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let file = dir.path().join("img.ppm");
        std::fs::write(&file, b"P6 old").unwrap();
        RECENT_S.store(-1, std::sync::atomic::Ordering::Relaxed);
        attach(&store);
        let d1 = digest(&file).unwrap();
        assert_eq!(d1, blake3::hash(b"P6 old").to_hex().to_string());
        save().unwrap();
        assert!(store.join("cache").join(FILE).is_file());
        attach(&store);
        assert!(
            is_cached(&file),
            "the saved cache answers for an unchanged file"
        );
        assert_eq!(digest(&file).unwrap(), d1);
        // Rewrite with the same size and set the modification time back: the status-change
        // time still moves, so the file is re-hashed.
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"P6 new").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(!is_cached(&file));
        assert_eq!(
            digest(&file).unwrap(),
            blake3::hash(b"P6 new").to_hex().to_string()
        );
        RECENT_S.store(2, std::sync::atomic::Ordering::Relaxed);
    }
}
