//! `remote`, `push`, `pull`, `bundle` and `unbundle`: moving objects between stores.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{RemoteAction, Selection, ShareArgs, human_bytes};
use crate::spec::LoadedSpec;
use crate::store::Store;

/// `ieu-bench remote`.
pub(super) fn remote(action: RemoteAction, store: PathBuf) -> Result<()> {
    let store = Store::open(&store)?;
    match action {
        RemoteAction::Add { name, url } => {
            let url = crate::store::remote::add(store.root(), &name, &url)?;
            println!("remote {name} = {url}");
        }
        RemoteAction::List => {
            for (name, url) in crate::store::remote::configured(store.root())? {
                println!("{name}\t{url}");
            }
        }
        RemoteAction::Remove { name } => {
            crate::store::remote::remove(store.root(), &name)?;
            println!("removed remote {name}");
        }
    }
    Ok(())
}

/// `ieu-bench push`.
pub(super) fn push(share: ShareArgs) -> Result<()> {
    let store = Store::open_existing(&share.sel.store)?;
    crate::store::stat_cache::attach(store.root());
    let (name, targets) = remote_and_targets(&store, &share.words);
    let (rname, url) = crate::store::remote::choose(store.root(), name.as_deref())?;
    let remote = crate::store::remote::Remote::open(&rname, &url, true)?;
    let (keys, _) = target_keys(&targets, &share.sel, &|h| Ok(vec![store.resolve(h)?]))?;
    // A spec's steps that this store does not hold are simply not sent.
    let held: Vec<String> = keys.into_iter().filter(|k| store.contains(k)).collect();
    let rep = crate::store::share::push(&store, &remote, &held)?;
    println!(
        "pushed {} objects ({} files, {}) to {}; {} already there",
        rep.sent,
        rep.files,
        human_bytes(rep.bytes),
        remote.describe(),
        rep.already
    );
    if !rep.missing.is_empty() {
        eprintln!(
            "note: {} inputs of the pushed steps are not in this store and were not sent",
            rep.missing.len()
        );
    }
    Ok(())
}

/// `ieu-bench pull`.
pub(super) fn pull(share: ShareArgs) -> Result<()> {
    let store = Store::open(&share.sel.store)?;
    crate::store::stat_cache::attach(store.root());
    let (name, targets) = remote_and_targets(&store, &share.words);
    let (rname, url) = crate::store::remote::choose(store.root(), name.as_deref())?;
    let remote = crate::store::remote::Remote::open(&rname, &url, false)?;
    let resolve = |h: &str| -> Result<Vec<String>> {
        if h.len() == 64 {
            return Ok(vec![h.to_ascii_lowercase()]);
        }
        let found = remote.keys_with_prefix(&h.to_ascii_lowercase())?;
        match found.len() {
            1 => Ok(found),
            0 => bail!("{} has no object with hash {h}", remote.describe()),
            n => bail!(
                "hash prefix {h} is ambiguous on {} ({n} objects)",
                remote.describe()
            ),
        }
    };
    let (keys, named_hashes) = target_keys(&targets, &share.sel, &resolve)?;
    let rep = crate::store::share::pull(&store, &remote, &keys, named_hashes)?;
    println!(
        "pulled {} objects ({}) from {}; {} already here, {} not on the remote",
        rep.fetched,
        human_bytes(rep.bytes),
        remote.describe(),
        rep.present,
        rep.absent.len()
    );
    report_refused(&rep)
}

/// `ieu-bench bundle`.
pub(super) fn bundle(targets: Vec<String>, out: PathBuf, sel: Selection) -> Result<()> {
    let store = Store::open_existing(&sel.store)?;
    crate::store::stat_cache::attach(store.root());
    let (keys, _) = target_keys(&targets, &sel, &|h| Ok(vec![store.resolve(h)?]))?;
    let held: Vec<String> = keys.into_iter().filter(|k| store.contains(k)).collect();
    let (closure, _) = crate::store::share::local_closure(&store, &held)?;
    if closure.is_empty() {
        bail!("nothing to bundle: the store holds none of the named steps");
    }
    let rep = crate::store::bundle::write(&store, &closure, &out)?;
    println!(
        "wrote {} ({} objects, {} before compression)",
        out.display(),
        rep.objects,
        human_bytes(rep.bytes)
    );
    Ok(())
}

/// `ieu-bench unbundle`.
pub(super) fn unbundle(file: PathBuf, store: PathBuf) -> Result<()> {
    let store = Store::open(&store)?;
    let rep = crate::store::bundle::read(&store, &file)?;
    println!(
        "imported {} objects from {}; {} already here",
        rep.imported,
        file.display(),
        rep.present
    );
    Ok(())
}

/// Errors for objects a pull refused.
pub(super) fn report_refused(rep: &crate::store::share::PullReport) -> Result<()> {
    if !rep.failed() {
        return Ok(());
    }
    let mut msg = String::new();
    for (k, label, why) in &rep.refused {
        msg.push_str(&format!("refused {label} ({k}): {why}\n"));
    }
    if !rep.blocked.is_empty() {
        let labels: Vec<&str> = rep.blocked.iter().map(|(_, l)| l.as_str()).collect();
        msg.push_str(&format!(
            "not published, because they were computed from a refused object: {}\n",
            labels.join(", ")
        ));
    }
    msg.push_str(&format!(
        "{} objects that verified were kept",
        rep.fetched + rep.present
    ));
    bail!("{msg}")
}

/// The keys a list of targets names: a spec's planned steps (at the selection's scale),
/// or step hashes resolved by `resolve`. No targets: the embedded default spec.
fn target_keys(
    targets: &[String],
    sel: &Selection,
    resolve: &dyn Fn(&str) -> Result<Vec<String>>,
) -> Result<(Vec<String>, bool)> {
    let mut keys = Vec::new();
    let mut any_hash = false;
    let specs: Vec<Option<PathBuf>> = if targets.is_empty() {
        vec![None]
    } else {
        Vec::new()
    };
    let mut spec_targets = specs;
    for t in targets {
        let p = PathBuf::from(t);
        if p.is_file() || t.ends_with(".yaml") || t.ends_with(".yml") {
            spec_targets.push(Some(p));
        } else if t.len() >= 4 && t.chars().all(|c| c.is_ascii_hexdigit()) {
            keys.extend(resolve(t)?);
            any_hash = true;
        } else {
            bail!("'{t}' is neither a spec file nor a step hash (nor a configured remote)");
        }
    }
    for spec in spec_targets {
        let mut loaded = LoadedSpec::load(spec.as_deref())?;
        loaded.apply_only(&sel.only)?;
        let scale = loaded.scale(&sel.scale)?;
        let plan = crate::spec::plan::plan_seeds(
            &loaded,
            &scale,
            sel.data_dir.as_deref(),
            &sel.seeds,
            true,
        )?;
        keys.extend(plan.steps.iter().map(|s| s.key.clone()));
    }
    Ok((keys, any_hash))
}

/// Splits `[REMOTE] TARGETS...`.
fn remote_and_targets(store: &Store, words: &[String]) -> (Option<String>, Vec<String>) {
    match words.first() {
        Some(w) if crate::store::remote::is_remote_word(store.root(), w) => {
            (Some(w.clone()), words[1..].to_vec())
        }
        _ => (None, words.to_vec()),
    }
}
