//! `show`, `gc`, `verify` and `ls`: looking after the local store.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::{human_age, human_bytes};
use crate::spec::LoadedSpec;
use crate::store::Store;

/// Opens an existing store (never creating one) and resolves a step hash or prefix in it.
pub(super) fn resolve_in_store(root: &std::path::Path, hash: &str) -> Result<(Store, String)> {
    let store = Store::open_existing(root)?;
    let key = store.resolve(hash)?;
    Ok((store, key))
}

/// `ieu-bench show`.
pub(super) fn show(hash: String, store: PathBuf, verify: bool) -> Result<()> {
    let (store, key) = resolve_in_store(&store, &hash)?;
    let m = store.manifest(&key)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    println!(
        "code: {} {} (backend {})",
        if m.code_identity.is_empty() {
            "?"
        } else {
            &m.code_identity
        },
        if m.code.is_empty() {
            "(computed before code identities)"
        } else {
            &m.code
        },
        m.backend
    );
    if verify {
        store.verify(&key)?;
        println!("verified: every output matches its digest");
    }
    Ok(())
}

/// `ieu-bench gc`.
pub(super) fn gc(
    keep: Vec<PathBuf>,
    older_than: Option<String>,
    delete: bool,
    scales: Vec<String>,
    seeds: Vec<u64>,
    store: PathBuf,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let store = Store::open_existing(&store)?;
    crate::store::stat_cache::attach(store.root());
    let age = older_than
        .as_deref()
        .map(crate::store::gc::parse_age)
        .transpose()?;
    let mut planned = Vec::new();
    for spec in &keep {
        let loaded = LoadedSpec::load(Some(spec))?;
        // Every dataset must be found, or the steps built on it could not be told
        // apart from garbage.
        for name in &loaded.spec.grid.dataset {
            let entry = loaded.spec.datasets.get(name);
            let format = entry.map(|e| e.format.name());
            let root = entry.map(|e| loaded.dir.join(&e.path));
            crate::data::Format::of(name, format)
                    .and_then(|f| crate::data::find(f, data_dir.as_deref(), root.as_deref()))
                    .with_context(|| {
                        format!(
                            "kept spec {}: dataset {name} cannot be read, so its steps cannot be protected (pass --data-dir)",
                            spec.display()
                        )
                    })?;
        }
        let explicit = !scales.is_empty();
        let names = if explicit {
            scales.clone()
        } else {
            loaded.scale_names()?
        };
        for sc in names {
            let scale = loaded.scale(&sc)?;
            match crate::spec::plan::plan_seeds(&loaded, &scale, data_dir.as_deref(), &seeds, false)
            {
                Ok(plan) => planned.extend(plan.steps.iter().map(|s| s.key.clone())),
                // A spec that cannot be planned at a scale has no steps there.
                Err(e) if !explicit => eprintln!(
                    "note: {} does not plan at scale {sc} ({e:#}); nothing of it to keep there",
                    spec.display()
                ),
                Err(e) => return Err(e),
            }
        }
    }
    let held: Vec<String> = planned.into_iter().filter(|k| store.contains(k)).collect();
    let (closure, _) = crate::store::share::local_closure(&store, &held)?;
    let keep_set: std::collections::HashSet<String> = closure.into_iter().collect();
    let plan = crate::store::gc::plan(&store, &keep_set, age)?;
    for l in &plan.remove {
        println!(
            "{} {:<10} {} {:>9}  {}",
            if delete { "remove" } else { "would remove" },
            l.kind,
            &l.key[..12],
            human_bytes(l.bytes),
            l.label
        );
    }
    if delete {
        let (removed, busy) = crate::store::gc::apply(&store, &plan)?;
        println!(
            "removed {removed} objects ({}); kept {}",
            human_bytes(plan.bytes()),
            plan.kept
        );
        if !busy.is_empty() {
            println!("skipped {} objects in use by another process", busy.len());
        }
    } else {
        println!(
            "would remove {} objects ({}); kept {} (dry run: pass --delete to remove)",
            plan.remove.len(),
            human_bytes(plan.bytes()),
            plan.kept
        );
    }
    Ok(())
}

/// `ieu-bench verify`.
pub(super) fn verify(store: PathBuf) -> Result<()> {
    let store = Store::open_existing(&store)?;
    let keys = store.keys()?;
    let mut damaged = 0;
    let mut bytes = 0u64;
    for key in &keys {
        match store.verify(key) {
            Ok(m) => bytes += m.outputs.values().map(|d| d.bytes).sum::<u64>(),
            Err(e) => {
                damaged += 1;
                eprintln!("damaged: {e:#}");
            }
        }
    }
    println!(
        "verified {} objects ({}): {} intact, {damaged} damaged",
        keys.len(),
        human_bytes(bytes),
        keys.len() - damaged
    );
    if damaged > 0 {
        bail!(
            "{damaged} damaged objects in store {} (quarantined; `ieu-bench run` recomputes them)",
            store.root().display()
        );
    }
    Ok(())
}

/// `ieu-bench ls`.
pub(super) fn ls(store: PathBuf, kind: Option<String>) -> Result<()> {
    let store = Store::open_existing(&store)?;
    let now = chrono::Utc::now();
    let rows: Vec<_> = store
        .list()?
        .into_iter()
        .filter(|l| kind.as_deref().is_none_or(|k| l.kind == k))
        .collect();
    println!(
        "{:<10} {:<12} {:>9} {:>6}  {:<8} label",
        "kind", "key", "size", "age", "backend"
    );
    let mut total = 0;
    for l in &rows {
        total += l.bytes;
        let age = chrono::DateTime::parse_from_rfc3339(&l.created)
            .map(|t| human_age(now.signed_duration_since(t.with_timezone(&chrono::Utc))))
            .unwrap_or_else(|_| "?".into());
        println!(
            "{:<10} {:<12} {:>9} {:>6}  {:<8} {}",
            l.kind,
            &l.key[..l.key.len().min(12)],
            human_bytes(l.bytes),
            age,
            l.backend,
            l.label
        );
    }
    println!("{} objects, {}", rows.len(), human_bytes(total));
    Ok(())
}
