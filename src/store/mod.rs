//! Content-addressed artefact store.
//!
//! Layout under the store root:
//! - `objects/<key>/` — one published step: its output files plus `manifest.json`;
//! - `tmp/` — staging directories of steps being computed;
//! - `locks/<key>.lock` — the per-key advisory lock held while a step is computed;
//! - `quarantine/` — objects whose files no longer match their manifest, moved aside;
//! - `cache/` — the data-file digest cache ([`stat_cache`]).
//!
//! **Atomic writes.** A step writes into a fresh staging directory under `tmp/`, every file
//! is fsynced, the manifest is written last, and the directory is renamed into `objects/`.
//! A killed run leaves at most a stale staging directory, never an object that looks
//! complete: an object exists if and only if its directory exists under `objects/`.
//!
//! **Verified reads.** [`Store::verified`] re-hashes an object's files against its manifest
//! (once per object per process) before anything uses them. A mismatch moves the object to
//! `quarantine/` and is an error naming the step, the file and both digests; `run` then
//! recomputes the step.
//!
//! **One computation per key.** [`Store::try_lock`] takes an exclusive advisory lock
//! (`flock`, through `std::fs::File::try_lock`) on `locks/<key>.lock`; the operating system
//! releases it when the holder exits or is killed, so a dead run never blocks anyone. A
//! staging directory is named after the key it computes and is only ever created under that
//! key's lock, so [`Store::sweep_stale`] removes exactly the staging directories whose lock
//! it can take: their owner is gone, on this host or any other that shares the store.

pub mod bundle;
pub mod gc;
pub mod remote;
pub mod share;
pub mod stat_cache;
mod verify;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

pub use verify::Damaged;
use verify::{forget_verified, mark_verified};

/// File name of the manifest inside an object directory.
pub const MANIFEST: &str = "manifest.json";

/// Digest and size of one output file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputDigest {
    pub blake3: String,
    pub bytes: u64,
}

/// What a published step records about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub kind: String,
    pub label: String,
    /// The code identity that computed it (`finetune/ieu`, …; see build.rs) and its digest;
    /// both entered the key.
    #[serde(default)]
    pub code_identity: String,
    #[serde(default)]
    pub code: String,
    /// Locked versions of the crates that do the arithmetic (part of `code`).
    #[serde(default)]
    pub dependencies: String,
    /// Version of ieu-bench that computed the step.
    pub tool_version: String,
    pub params: serde_json::Value,
    /// Input role -> key of the input step.
    pub inputs: BTreeMap<String, String>,
    /// Output file name -> digest.
    pub outputs: BTreeMap<String, OutputDigest>,
    pub duration_s: f64,
    /// Compute backend; part of the key for every kind but `dataset`.
    pub backend: String,
    /// Host and process that computed it.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    pub created: String,
}

/// A step's output directory while it is being computed.
pub struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The exclusive lock on one key; released when dropped (or when the process dies).
pub struct KeyLock {
    key: String,
    _file: File,
}

impl KeyLock {
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// One object of the store, for `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub key: String,
    pub kind: String,
    pub label: String,
    pub bytes: u64,
    pub created: String,
    pub backend: String,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["objects", "tmp", "locks"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create store directory {}", dir.display()))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Opens a store that must exist already (commands that only read never create one).
    pub fn open_existing(root: &Path) -> Result<Self> {
        if !root.join("objects").is_dir() {
            bail!(
                "no store at {} (pass --store or set IEU_STORE; `ieu-bench run` creates one)",
                root.display()
            );
        }
        Self::open(root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    /// Whether an object is published under `key` (not whether it is intact: see
    /// [`Store::verified`]).
    pub fn contains(&self, key: &str) -> bool {
        self.object_dir(key).join(MANIFEST).is_file()
    }

    fn lock_file(&self, key: &str) -> Result<File> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock {}", path.display()))
    }

    /// Takes `key`'s lock if no other process (or thread) holds it.
    pub fn try_lock(&self, key: &str) -> Result<Option<KeyLock>> {
        let file = self.lock_file(key)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(KeyLock {
                key: key.to_string(),
                _file: file,
            })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock key {key} in {}", self.root.display()))
            }
        }
    }

    /// Waits for `key`'s lock.
    pub fn lock(&self, key: &str) -> Result<KeyLock> {
        let file = self.lock_file(key)?;
        file.lock()
            .with_context(|| format!("cannot lock key {key} in {}", self.root.display()))?;
        Ok(KeyLock {
            key: key.to_string(),
            _file: file,
        })
    }

    /// Takes a shared lock on `key`: held by a step while it reads an input, so that `gc`
    /// (which needs the exclusive lock) never removes an object in use.
    pub fn lock_shared(&self, key: &str) -> Result<KeyLock> {
        let file = self.lock_file(key)?;
        file.lock_shared()
            .with_context(|| format!("cannot lock key {key} in {}", self.root.display()))?;
        Ok(KeyLock {
            key: key.to_string(),
            _file: file,
        })
    }

    /// Publishes an object computed elsewhere (pulled, unbundled): `staging` holds its files
    /// and `manifest` is its manifest as it was written there. Every file is checked against
    /// the manifest first; a mismatch is an error naming the key and the file, and nothing
    /// is published. The caller holds the key's lock.
    pub fn publish_foreign(&self, staging: Staging, manifest: &[u8]) -> Result<Manifest> {
        let m: Manifest =
            serde_json::from_slice(manifest).context("its manifest does not parse")?;
        let src = staging.path().to_path_buf();
        let got = digest_dir(&src)?;
        for (name, want) in &m.outputs {
            match got.get(name) {
                Some(d) if d == want => {}
                Some(d) => bail!(
                    "file {name} has blake3 {} ({} bytes), its manifest says {} ({} bytes)",
                    d.blake3,
                    d.bytes,
                    want.blake3,
                    want.bytes
                ),
                None => bail!("file {name} is missing"),
            }
        }
        if let Some(extra) = got.keys().find(|k| !m.outputs.contains_key(*k)) {
            bail!("file {extra} is not in its manifest");
        }
        write_synced(&src.join(MANIFEST), manifest)?;
        sync_dir(&src)?;
        let dst = self.object_dir(&m.key);
        let kept = staging.dir.keep();
        if let Err(e) = fs::rename(&kept, &dst) {
            let _ = fs::remove_dir_all(&kept);
            if !dst.join(MANIFEST).is_file() {
                return Err(e).with_context(|| format!("cannot publish {}", dst.display()));
            }
        }
        sync_dir(&self.root.join("objects"))?;
        mark_verified(&dst);
        Ok(m)
    }

    /// Removes an object (the caller holds its exclusive lock): it is renamed out of
    /// `objects/` first, so no reader sees it half-removed.
    pub fn remove_object(&self, lock: &KeyLock) -> Result<()> {
        let key = lock.key();
        let dir = self.object_dir(key);
        let doomed = self
            .root
            .join("tmp")
            .join(format!("gc-{key}-{}", std::process::id()));
        fs::rename(&dir, &doomed).with_context(|| format!("cannot remove {}", dir.display()))?;
        forget_verified(&dir);
        fs::remove_dir_all(&doomed)
            .with_context(|| format!("cannot remove {}", doomed.display()))?;
        Ok(())
    }

    /// A fresh, empty staging directory for computing the locked key.
    pub fn stage(&self, lock: &KeyLock) -> Result<Staging> {
        let prefix = format!(
            "stage-{}-{}-{}-",
            lock.key(),
            host_name(),
            std::process::id()
        );
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(self.root.join("tmp"))
            .context("cannot create a staging directory in the store")?;
        Ok(Staging { dir })
    }

    /// Removes staging directories left by runs that died; returns how many. A staging
    /// directory is named after its key and exists only while that key's lock is held, so
    /// one whose lock can be taken has no live owner, whichever host it was on. (Directories
    /// of older versions, `stage-<host>-<pid>-…`, are removed when that pid is gone from
    /// this host.)
    pub fn sweep_stale(&self) -> Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("gc-") {
                // A removal interrupted after its rename: finish it once its lock is free.
                let key = rest.split('-').next().unwrap_or("");
                if key.len() == 64 && self.try_lock(key)?.is_some() {
                    remove_staging(&entry.path())?;
                    removed += 1;
                }
                continue;
            }
            let Some(rest) = name.strip_prefix("stage-") else {
                continue;
            };
            let key = rest.split('-').next().unwrap_or("");
            let stale = if key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()) {
                match self.try_lock(key)? {
                    Some(lock) => {
                        remove_staging(&entry.path())?;
                        drop(lock);
                        removed += 1;
                        continue;
                    }
                    None => false,
                }
            } else {
                legacy_stale(rest)
            };
            if stale {
                remove_staging(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Publishes a staged step under `manifest.key` (whose lock the caller holds): digests
    /// and fsyncs every output, writes the manifest, then renames the directory into place.
    pub fn publish(&self, staging: Staging, mut manifest: Manifest) -> Result<Manifest> {
        let src = staging.path().to_path_buf();
        manifest.outputs = digest_dir(&src)?;
        let text = serde_json::to_string_pretty(&manifest)?;
        write_synced(&src.join(MANIFEST), text.as_bytes())?;
        sync_dir(&src)?;
        let dst = self.object_dir(&manifest.key);
        let kept = staging.dir.keep();
        match fs::rename(&kept, &dst) {
            Ok(()) => {}
            Err(_) if dst.join(MANIFEST).is_file() => {
                // Published meanwhile by a run that did not take the lock (an older version).
                let _ = fs::remove_dir_all(&kept);
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&kept);
                return Err(e).with_context(|| format!("cannot publish {}", dst.display()));
            }
        }
        sync_dir(&self.root.join("objects"))?;
        mark_verified(&dst);
        Ok(manifest)
    }

    pub fn manifest(&self, key: &str) -> Result<Manifest> {
        let path = self.object_dir(key).join(MANIFEST);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no artefact {key} in store {}", self.root.display()))?;
        serde_json::from_str(&text).with_context(|| format!("corrupt manifest {}", path.display()))
    }

    /// Resolves a full key or a unique prefix of at least 4 hex digits.
    pub fn resolve(&self, prefix: &str) -> Result<String> {
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("'{prefix}' is not a step hash (give at least 4 hex digits)");
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut found: Vec<String> = self
            .keys()?
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .collect();
        match found.len() {
            0 => bail!(
                "no artefact with hash {prefix} in store {}",
                self.root.display()
            ),
            1 => Ok(found.pop().unwrap()),
            n => bail!("hash prefix {prefix} is ambiguous ({n} artefacts match)"),
        }
    }

    /// Keys of every published object.
    pub fn keys(&self) -> Result<Vec<String>> {
        let objects = self.root.join("objects");
        let mut keys = Vec::new();
        for entry in
            fs::read_dir(&objects).with_context(|| format!("cannot read {}", objects.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            keys.push(name);
        }
        keys.sort();
        Ok(keys)
    }

    /// What the store holds, oldest first.
    pub fn list(&self) -> Result<Vec<Listing>> {
        let mut out = Vec::new();
        for key in self.keys()? {
            let listing = match self.manifest(&key) {
                Ok(m) => Listing {
                    bytes: m.outputs.values().map(|d| d.bytes).sum(),
                    key,
                    kind: m.kind,
                    label: m.label,
                    created: m.created,
                    backend: m.backend,
                },
                Err(_) => Listing {
                    key,
                    kind: "?".into(),
                    label: "(no readable manifest)".into(),
                    bytes: 0,
                    created: String::new(),
                    backend: String::new(),
                },
            };
            out.push(listing);
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.key.cmp(&b.key)));
        Ok(out)
    }
}

fn remove_staging(path: &Path) -> Result<()> {
    fs::remove_dir_all(path)
        .with_context(|| format!("cannot remove stale staging {}", path.display()))
}

/// Staging directories of older versions, `stage-<host>-<pid>-…`: stale when they are of
/// this host and the pid is gone.
fn legacy_stale(rest: &str) -> bool {
    let host = host_name();
    if host == "unknown" || !Path::new("/proc/self").exists() {
        return false;
    }
    let Some(rest) = rest.strip_prefix(&format!("{host}-")) else {
        return false;
    };
    match rest.split('-').next().map(str::parse::<u32>) {
        Some(Ok(pid)) => !Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

/// blake3 digest and size of one file.
pub fn digest_file(path: &Path) -> Result<OutputDigest> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(OutputDigest {
        blake3: hasher.finalize().to_hex().to_string(),
        bytes,
    })
}

fn digest_dir(dir: &Path) -> Result<BTreeMap<String, OutputDigest>> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(dir)?
            .to_string_lossy()
            .replace('\\', "/");
        if rel == MANIFEST {
            continue;
        }
        File::open(entry.path())?.sync_all()?;
        out.insert(rel, digest_file(entry.path())?);
    }
    Ok(out)
}

/// This machine's host name (`-` and `/` replaced), or `unknown`.
pub fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if name.is_empty() {
        return "unknown".into();
    }
    name.replace(['-', '/', '.'], "_")
}

/// Writes `value` as pretty JSON with [`write_synced`].
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    write_synced(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Writes a file outside the store atomically: a temporary file beside it, fsynced, then
/// renamed over `path`. On any error (a full disk) `path` is untouched and no partial file
/// is left.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// [`write_atomic`] with a writer callback.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ieu-bench-")
        .tempfile_in(&parent)
        .with_context(|| format!("cannot write {}", path.display()))?;
    write(tmp.as_file_mut())
        .and_then(|_| tmp.as_file().sync_all().map_err(Into::into))
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Writes a file and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes the rename durable; not every platform allows it.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
