//! Verified reads: an object's files are re-hashed against its manifest (once per object
//! per process) before anything uses them; a damaged object is quarantined.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, bail};

use super::{MANIFEST, Manifest, Store, digest_file};

/// A stored object whose files do not match its manifest (it has been quarantined).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Damaged(pub String);

/// Object directories verified by this process (each is hashed once).
static VERIFIED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

impl Store {
    /// Checks every file of an object against its manifest, now (no per-process memo).
    /// `Err` describes the first mismatch; the object is left where it is.
    pub(super) fn check(&self, key: &str) -> Result<Manifest, String> {
        let dir = self.object_dir(key);
        let path = dir.join(MANIFEST);
        let text =
            fs::read_to_string(&path).map_err(|e| format!("cannot read its manifest: {e}"))?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| format!("its manifest does not parse: {e}"))?;
        if m.key != key {
            return Err(format!("its manifest names another key, {}", m.key));
        }
        for (name, want) in &m.outputs {
            let got = digest_file(&dir.join(name)).map_err(|e| format!("file {name}: {e:#}"))?;
            if &got != want {
                return Err(format!(
                    "file {name} has blake3 {} ({} bytes), its manifest says {} ({} bytes)",
                    got.blake3, got.bytes, want.blake3, want.bytes
                ));
            }
        }
        Ok(m)
    }

    /// Moves a damaged object out of `objects/` into `quarantine/`; returns where it went.
    pub fn quarantine(&self, key: &str, reason: &str) -> Result<PathBuf> {
        let qdir = self.root.join("quarantine");
        fs::create_dir_all(&qdir)?;
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let dst = qdir.join(format!("{key}-{stamp}-{}", std::process::id()));
        match fs::rename(self.object_dir(key), &dst) {
            Ok(()) => {}
            // Another process quarantined it first.
            Err(_) if !self.object_dir(key).exists() => return Ok(qdir),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot quarantine artefact {key}"));
            }
        }
        let _ = fs::write(dst.join("QUARANTINED.txt"), format!("{reason}\n"));
        forget_verified(&self.object_dir(key));
        Ok(dst)
    }

    /// The object's directory once every file has been checked against the manifest (once
    /// per process). A damaged object is quarantined and the error names the step, the file
    /// and both digests (a [`Damaged`] error).
    pub fn verified(&self, key: &str) -> Result<PathBuf> {
        let dir = self.object_dir(key);
        if is_verified(&dir) {
            return Ok(dir);
        }
        if !dir.join(MANIFEST).is_file() {
            bail!("no artefact {key} in store {}", self.root.display());
        }
        match self.check(key) {
            Ok(_) => {
                mark_verified(&dir);
                Ok(dir)
            }
            Err(why) => Err(self.damaged(key, &why)),
        }
    }

    pub(super) fn damaged(&self, key: &str, why: &str) -> anyhow::Error {
        let label = self
            .manifest(key)
            .map(|m| format!("{} '{}'", m.kind, m.label))
            .unwrap_or_else(|_| "step".into());
        let msg = format!("stored {label} ({key}) is damaged: {why}");
        match self.quarantine(key, &msg) {
            Ok(dst) => anyhow!(Damaged(format!(
                "{msg}; moved to {} (never used; `ieu-bench run` recomputes it)",
                dst.display()
            ))),
            Err(e) => anyhow!(Damaged(format!("{msg}; and {e:#}"))),
        }
    }

    /// Re-hashes every file of an object now, quarantining it when damaged.
    pub fn verify(&self, key: &str) -> Result<Manifest> {
        match self.check(key) {
            Ok(m) => {
                mark_verified(&self.object_dir(key));
                Ok(m)
            }
            Err(why) => Err(self.damaged(key, &why)),
        }
    }
}

pub(super) fn is_verified(dir: &Path) -> bool {
    VERIFIED
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|s| s.contains(dir))
}

pub(super) fn mark_verified(dir: &Path) {
    VERIFIED
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(dir.to_path_buf());
}

pub(super) fn forget_verified(dir: &Path) {
    if let Some(s) = VERIFIED.lock().unwrap().as_mut() {
        s.remove(dir);
    }
}
