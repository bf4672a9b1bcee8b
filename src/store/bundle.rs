//! Bundles: a closure of objects as one `tar.zst` file, for mail and archives (a paper's
//! supplementary material: unbundle it and `report` renders the tables without
//! recomputing anything).
//!
//! The archive holds `ieu-bundle.json` (format, tool version, the keys) and, for every key,
//! `objects/<key>/<file>` including its `manifest.json`. `unbundle` unpacks into a
//! temporary directory inside the store, checks that the archive is complete (every key
//! listed has a manifest and every file the manifest names, with its digest), and only
//! then publishes the objects; a truncated or damaged bundle is an error and imports
//! nothing.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::{MANIFEST, Manifest, Store};

const INDEX: &str = "ieu-bundle.json";

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    format: u32,
    tool_version: String,
    created: String,
    keys: Vec<String>,
}

#[derive(Debug, Default)]
pub struct BundleReport {
    pub objects: usize,
    pub bytes: u64,
}

/// Writes `keys` (a closure, inputs first) into `out`, atomically.
pub fn write(store: &Store, keys: &[String], out: &Path) -> Result<BundleReport> {
    let mut rep = BundleReport::default();
    let mut dirs = Vec::new();
    for k in keys {
        let dir = store
            .verified(k)
            .with_context(|| format!("not bundling {k}"))?;
        let m = store.manifest(k)?;
        rep.bytes += m.outputs.values().map(|d| d.bytes).sum::<u64>();
        dirs.push((k.clone(), dir, m));
    }
    let index = Index {
        format: 1,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        created: chrono::Utc::now().to_rfc3339(),
        keys: keys.to_vec(),
    };
    super::write_atomic_with(out, |file| {
        let enc = zstd::Encoder::new(file, 3)?;
        let mut tar = tar::Builder::new(enc);
        let idx = serde_json::to_vec_pretty(&index)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(idx.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, INDEX, &idx[..])?;
        for (k, dir, m) in &dirs {
            for name in m.outputs.keys().map(String::as_str).chain([MANIFEST]) {
                tar.append_path_with_name(dir.join(name), format!("objects/{k}/{name}"))?;
            }
        }
        tar.into_inner()?.finish()?;
        Ok(())
    })?;
    rep.objects = keys.len();
    Ok(rep)
}

#[derive(Debug, Default)]
pub struct UnbundleReport {
    pub imported: usize,
    pub present: usize,
}

/// Verifies every object of the bundle at `file`, then publishes those the store lacks.
pub fn read(store: &Store, file: &Path) -> Result<UnbundleReport> {
    let origin = file.display().to_string();
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {origin}"))?;
    let tmp = tempfile::Builder::new()
        .prefix("unbundle-")
        .tempdir_in(store.root().join("tmp"))?;
    let dec = zstd::Decoder::new(f).with_context(|| format!("{origin}: not a zstd stream"))?;
    let mut ar = tar::Archive::new(dec);
    ar.unpack(tmp.path()).map_err(|e| {
        anyhow!("{origin}: the bundle is truncated or damaged ({e}); nothing was imported")
    })?;
    let idx_path = tmp.path().join(INDEX);
    let index: Index = serde_json::from_slice(
        &std::fs::read(&idx_path)
            .map_err(|_| anyhow!("{origin}: no {INDEX}: not an ieu-bench bundle"))?,
    )
    .with_context(|| format!("{origin}: corrupt {INDEX}"))?;
    if index.format != 1 {
        bail!(
            "{origin}: bundle format {} (this ieu-bench reads format 1)",
            index.format
        );
    }
    // Everything verifies before anything is published.
    let mut manifests = Vec::new();
    for k in &index.keys {
        let dir = tmp.path().join("objects").join(k);
        let bytes = std::fs::read(dir.join(MANIFEST)).map_err(|_| {
            anyhow!(
                "{origin}: object {k} has no manifest (truncated bundle?); nothing was imported"
            )
        })?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{origin}: object {k}: corrupt manifest"))?;
        if &m.key != k {
            bail!("{origin}: object {k}: its manifest names {}", m.key);
        }
        for (name, want) in &m.outputs {
            let got = super::digest_file(&dir.join(name)).map_err(|_| {
                anyhow!(
                    "{origin}: object {k} ({}): file {name} is missing; nothing was imported",
                    m.label
                )
            })?;
            if &got != want {
                bail!(
                    "{origin}: object {k} ({}): file {name} has blake3 {}, its manifest says {}; nothing was imported",
                    m.label,
                    got.blake3,
                    want.blake3
                );
            }
        }
        manifests.push((k.clone(), dir, bytes));
    }
    let mut rep = UnbundleReport::default();
    for (k, dir, bytes) in manifests {
        let lock = store.lock(&k)?;
        if store.contains(&k) {
            rep.present += 1;
            continue;
        }
        let staging = store.stage(&lock)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name() == MANIFEST {
                continue;
            }
            std::fs::rename(entry.path(), staging.path().join(entry.file_name()))?;
        }
        store
            .publish_foreign(staging, &bytes)
            .with_context(|| format!("{origin}: object {k}"))?;
        rep.imported += 1;
    }
    Ok(rep)
}
