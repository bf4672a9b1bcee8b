//! Sharing by key: the closure of what is named (a step and every step it was computed
//! from), `push` to a remote, `pull` from one.
//!
//! - **push** sends each object of the closure the remote does not have yet, every file
//!   first and the manifest last (see [`super::remote`]); objects are verified locally
//!   before they leave. A push that dies half-way is resumed by running it again: objects
//!   whose manifest reached the remote are skipped, the others are sent whole.
//! - **pull** fetches the closure from the remote, inputs before the steps computed from
//!   them, into staging directories; every file is checked against the remote manifest
//!   before the object is published (atomically, under its key's lock). An object that
//!   does not verify is refused by name, and nothing computed from it is published; the
//!   rest of the closure is kept.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::{Context, Result, anyhow, bail};

use super::remote::Remote;
use super::{MANIFEST, Manifest, Store};

/// Every key reachable from `roots` through the local manifests' inputs, inputs first.
/// Keys the store does not hold are returned in `missing`.
pub fn local_closure(store: &Store, roots: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let mut order = Vec::new();
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for r in roots {
        visit_local(store, r, &mut seen, &mut order, &mut missing)?;
    }
    Ok((order, missing))
}

fn visit_local(
    store: &Store,
    key: &str,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
    missing: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(key.to_string()) {
        return Ok(());
    }
    if !store.contains(key) {
        missing.push(key.to_string());
        return Ok(());
    }
    let m = store.manifest(key)?;
    for input in m.inputs.values() {
        visit_local(store, input, seen, order, missing)?;
    }
    order.push(key.to_string());
    Ok(())
}

#[derive(Debug, Default)]
pub struct PushReport {
    pub sent: usize,
    pub already: usize,
    pub files: usize,
    pub bytes: u64,
    /// Keys named (or needed) that this store does not hold.
    pub missing: Vec<String>,
}

/// Pushes the closure of `roots` to `remote`.
pub fn push(store: &Store, remote: &Remote, roots: &[String]) -> Result<PushReport> {
    let (order, missing) = local_closure(store, roots)?;
    let mut rep = PushReport {
        missing,
        ..Default::default()
    };
    let total = order.len();
    for (i, key) in order.iter().enumerate() {
        if remote.has(key)? {
            rep.already += 1;
            continue;
        }
        let dir = store
            .verified(key)
            .with_context(|| format!("not pushing {key}"))?;
        let manifest_bytes = std::fs::read(dir.join(MANIFEST))?;
        let m: Manifest = serde_json::from_slice(&manifest_bytes)?;
        for (name, d) in &m.outputs {
            remote.put_file(key, name, &dir.join(name))?;
            rep.files += 1;
            rep.bytes += d.bytes;
        }
        // The manifest last: from now on the remote has the object.
        remote.put_bytes(key, MANIFEST, manifest_bytes)?;
        rep.sent += 1;
        tracing::info!("[{}/{total}] pushed {} ({})", i + 1, m.label, &key[..12]);
    }
    Ok(rep)
}

#[derive(Debug, Default)]
pub struct PullReport {
    /// Objects fetched and published.
    pub fetched: usize,
    /// Objects this store already had.
    pub present: usize,
    pub bytes: u64,
    /// (key, label, why) of objects that did not verify.
    pub refused: Vec<(String, String, String)>,
    /// (key, label) of objects not published because something they were computed from
    /// was refused.
    pub blocked: Vec<(String, String)>,
    /// Named keys the remote does not have (and this store neither).
    pub absent: Vec<String>,
}

impl PullReport {
    pub fn failed(&self) -> bool {
        !self.refused.is_empty() || !self.blocked.is_empty()
    }
}

enum State {
    Ok,
    Bad,
    Absent,
}

/// Pulls the closure of `roots` from `remote`. With `required`, a root the remote lacks is
/// an error (hashes named by the user); otherwise it is counted in `absent` (a spec's
/// steps nobody has computed yet).
pub fn pull(
    store: &Store,
    remote: &Remote,
    roots: &[String],
    required: bool,
) -> Result<PullReport> {
    let mut rep = PullReport::default();
    let mut state: HashMap<String, State> = HashMap::new();
    for r in roots {
        if !store.contains(r) && !remote.has(r)? {
            if required {
                bail!("{} has no object {r}", remote.describe());
            }
            rep.absent.push(r.clone());
            continue;
        }
        visit_remote(store, remote, r, &mut state, &mut rep, &mut BTreeSet::new())?;
    }
    Ok(rep)
}

fn visit_remote(
    store: &Store,
    remote: &Remote,
    key: &str,
    state: &mut HashMap<String, State>,
    rep: &mut PullReport,
    path: &mut BTreeSet<String>,
) -> Result<bool> {
    if let Some(s) = state.get(key) {
        return Ok(matches!(s, State::Ok));
    }
    if !path.insert(key.to_string()) {
        bail!("object {key} depends on itself");
    }
    // What the object was computed from: from the local manifest if we have it.
    let (manifest_bytes, local) = if store.contains(key) {
        (std::fs::read(store.object_dir(key).join(MANIFEST))?, true)
    } else {
        match remote.manifest_bytes(key)? {
            Some(b) => (b, false),
            None => {
                state.insert(key.to_string(), State::Absent);
                rep.absent.push(key.to_string());
                path.remove(key);
                return Ok(false);
            }
        }
    };
    let parsed: Result<Manifest> = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| anyhow!("its manifest does not parse: {e}"));
    let m = match parsed {
        Ok(m) if m.key == key => m,
        Ok(m) => {
            refuse(
                rep,
                state,
                key,
                "?",
                &format!("its manifest names another key, {}", m.key),
            );
            path.remove(key);
            return Ok(false);
        }
        Err(e) => {
            refuse(rep, state, key, "?", &format!("{e:#}"));
            path.remove(key);
            return Ok(false);
        }
    };
    let mut inputs_ok = true;
    for input in m.inputs.values() {
        let ok = visit_remote(store, remote, input, state, rep, path)?;
        // An input nobody has is not damage (it may have been collected); a refused one is.
        if !ok && !matches!(state.get(input), Some(State::Absent)) {
            inputs_ok = false;
        }
    }
    path.remove(key);
    if local {
        rep.present += 1;
        state.insert(key.to_string(), State::Ok);
        return Ok(true);
    }
    if !inputs_ok {
        rep.blocked.push((key.to_string(), m.label.clone()));
        state.insert(key.to_string(), State::Bad);
        return Ok(false);
    }
    let lock = store.lock(key)?;
    if store.contains(key) {
        rep.present += 1;
        state.insert(key.to_string(), State::Ok);
        return Ok(true);
    }
    let staging = store.stage(&lock)?;
    let mut bytes = 0;
    for (name, want) in &m.outputs {
        let got = remote.get_file(key, name, &staging.path().join(name))?;
        if &got != want {
            let why = format!(
                "file {name} has blake3 {} ({} bytes), its manifest says {} ({} bytes)",
                got.blake3, got.bytes, want.blake3, want.bytes
            );
            refuse(rep, state, key, &m.label, &why);
            return Ok(false);
        }
        bytes += got.bytes;
    }
    match store.publish_foreign(staging, &manifest_bytes) {
        Ok(_) => {
            rep.fetched += 1;
            rep.bytes += bytes;
            tracing::info!("pulled {} ({})", m.label, &key[..12]);
            state.insert(key.to_string(), State::Ok);
            Ok(true)
        }
        Err(e) => {
            refuse(rep, state, key, &m.label, &format!("{e:#}"));
            Ok(false)
        }
    }
}

fn refuse(
    rep: &mut PullReport,
    state: &mut HashMap<String, State>,
    key: &str,
    label: &str,
    why: &str,
) {
    tracing::error!("refused {label} ({key}): {why}");
    rep.refused
        .push((key.to_string(), label.to_string(), why.to_string()));
    state.insert(key.to_string(), State::Bad);
}
