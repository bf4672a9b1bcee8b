//! Content-addressed artefact store.
//!
//! Layout under the store root:
//! - `objects/<key>/` — one published step: its output files plus `manifest.json`;
//! - `tmp/` — staging directories of steps being computed.
//!
//! Publishing is atomic: a step writes into a fresh staging directory under `tmp/`, every
//! file is fsynced, the manifest is written last, and the directory is renamed into
//! `objects/`. A killed run leaves at most a stale staging directory, never an object
//! that looks complete. An object exists if and only if its directory exists under `objects/`.
//! Staging directories are named `stage-<host>-<pid>-…`; [`Store::sweep_stale`] (run at the
//! start of `run`) removes those of this host whose process no longer exists.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

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
    /// Per-kind code version that entered the key.
    pub kind_version: u32,
    /// Version of ieu-bench that computed the step.
    pub tool_version: String,
    pub params: serde_json::Value,
    /// Input role -> key of the input step.
    pub inputs: BTreeMap<String, String>,
    /// Output file name -> digest.
    pub outputs: BTreeMap<String, OutputDigest>,
    pub duration_s: f64,
    pub backend: String,
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

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["objects", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create store directory {}", dir.display()))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.object_dir(key).join(MANIFEST).is_file()
    }

    /// A fresh, empty staging directory for computing a step.
    pub fn stage(&self) -> Result<Staging> {
        let prefix = format!("stage-{}-{}-", host_name(), std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(self.root.join("tmp"))
            .context("cannot create a staging directory in the store")?;
        Ok(Staging { dir })
    }

    /// Removes staging directories left by killed runs on this host (their process is
    /// gone); returns how many. Directories of other hosts, of live processes, or named
    /// otherwise are left alone. Needs `/proc` (Linux); elsewhere it removes nothing.
    pub fn sweep_stale(&self) -> Result<usize> {
        let host = host_name();
        if host == "unknown" || !Path::new("/proc/self").exists() {
            return Ok(0);
        }
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&format!("stage-{host}-")) else {
                continue;
            };
            let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                fs::remove_dir_all(entry.path()).with_context(|| {
                    format!("cannot remove stale staging {}", entry.path().display())
                })?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Publishes a staged step under `manifest.key`: digests and fsyncs every output,
    /// writes the manifest, then renames the directory into place.
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
                // Another run published the same key first; the content is equivalent.
                let _ = fs::remove_dir_all(&kept);
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&kept);
                return Err(e).with_context(|| format!("cannot publish {}", dst.display()));
            }
        }
        sync_dir(&self.root.join("objects"))?;
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
        let mut found = Vec::new();
        let objects = self.root.join("objects");
        for entry in
            fs::read_dir(&objects).with_context(|| format!("cannot read {}", objects.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                found.push(name);
            }
        }
        match found.len() {
            0 => bail!(
                "no artefact with hash {prefix} in store {}",
                self.root.display()
            ),
            1 => Ok(found.pop().unwrap()),
            n => bail!("hash prefix {prefix} is ambiguous ({n} artefacts match)"),
        }
    }

    /// Verifies every output of an object against its manifest.
    pub fn verify(&self, key: &str) -> Result<()> {
        let m = self.manifest(key)?;
        let dir = self.object_dir(key);
        for (name, d) in &m.outputs {
            let got = digest_file(&dir.join(name))?;
            if &got != d {
                bail!("artefact {key}: output {name} does not match its manifest digest");
            }
        }
        Ok(())
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

/// Writes a file and fsyncs it.
/// Writes `value` as pretty JSON with [`write_synced`].
/// This machine's host name (`-` and `/` replaced), or `unknown`.
fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if name.is_empty() {
        return "unknown".into();
    }
    name.replace(['-', '/', '.'], "_")
}

pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    write_synced(path, serde_json::to_string_pretty(value)?.as_bytes())
}

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
mod tests {
    use super::*;

    fn manifest(key: &str) -> Manifest {
        Manifest {
            key: key.into(),
            kind: "test".into(),
            label: "t".into(),
            kind_version: 1,
            tool_version: "0".into(),
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            duration_s: 0.0,
            backend: "none".into(),
            created: "now".into(),
        }
    }

    #[test]
    fn unpublished_staging_is_invisible_and_publish_is_complete() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let key = "ab".repeat(32);
        let st = store.stage().unwrap();
        fs::write(st.path().join("a.txt"), b"hello").unwrap();
        assert!(!store.contains(&key), "a staged step must not be visible");
        drop(st); // a killed step: staging vanishes, nothing published
        assert!(!store.contains(&key));

        let st = store.stage().unwrap();
        fs::write(st.path().join("a.txt"), b"hello").unwrap();
        let m = store.publish(st, manifest(&key)).unwrap();
        assert!(store.contains(&key));
        assert_eq!(m.outputs["a.txt"].bytes, 5);
        assert_eq!(
            m.outputs["a.txt"].blake3,
            blake3::hash(b"hello").to_hex().to_string()
        );
        store.verify(&key).unwrap();
        assert_eq!(store.resolve(&key[..6]).unwrap(), key);

        fs::write(store.object_dir(&key).join("a.txt"), b"tampered").unwrap();
        assert!(store.verify(&key).is_err());
    }

    #[test]
    fn sweep_removes_staging_of_dead_processes_only() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let live = store.stage().unwrap();
        std::fs::write(live.path().join("x"), b"1").unwrap();
        let tmp = root.path().join("tmp");
        let host = host_name();
        // A process id above any pid_max: that run is certainly gone.
        let dead = tmp.join(format!("stage-{host}-999999999-abc"));
        let other_host = tmp.join("stage-elsewhere-999999999-abc");
        for d in [&dead, &other_host] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("model.safetensors"), b"half").unwrap();
        }
        let removed = store.sweep_stale().unwrap();
        if host != "unknown" && Path::new("/proc/self").exists() {
            assert_eq!(removed, 1);
            assert!(!dead.exists());
        }
        assert!(
            other_host.exists(),
            "another host's staging is not ours to judge"
        );
        assert!(
            live.path().join("x").exists(),
            "this process's staging stays"
        );
    }

    #[test]
    fn resolve_rejects_bad_and_missing_hashes() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        assert!(
            store
                .resolve("zz")
                .unwrap_err()
                .to_string()
                .contains("not a step hash")
        );
        assert!(
            store
                .resolve("abcd")
                .unwrap_err()
                .to_string()
                .contains("no artefact")
        );
    }
}
