//! Garbage collection: remove the objects no kept spec needs.
//!
//! The objects to keep are the closure of every step the kept specs plan (at the scales
//! asked for); everything else is a candidate, optionally only when older than a given
//! age. An object is removed only under its exclusive lock, which a step that is reading
//! it (shared lock) or computing it holds, so `gc` never removes an object in use; such
//! objects are skipped and reported.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, bail};

use super::{Listing, Store};

#[derive(Debug, Default)]
pub struct GcPlan {
    pub remove: Vec<Listing>,
    pub kept: usize,
}

impl GcPlan {
    pub fn bytes(&self) -> u64 {
        self.remove.iter().map(|l| l.bytes).sum()
    }
}

/// Parses an age such as `30d`, `12h`, `45m`, `90s`.
pub fn parse_age(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("--older-than {text}: expected a number and a unit, e.g. 30d, 12h, 45m")
    })?;
    let secs = match unit {
        "d" => n * 86400,
        "h" => n * 3600,
        "m" => n * 60,
        "s" | "" => n,
        _ => bail!("--older-than {text}: unknown unit '{unit}' (d, h, m or s)"),
    };
    Ok(Duration::from_secs(secs))
}

/// What `gc` would remove: every object not in `keep` (and, with `older_than`, created
/// longer ago than that).
pub fn plan(store: &Store, keep: &HashSet<String>, older_than: Option<Duration>) -> Result<GcPlan> {
    let now = chrono::Utc::now();
    let mut plan = GcPlan::default();
    for l in store.list()? {
        if keep.contains(&l.key) {
            plan.kept += 1;
            continue;
        }
        if let Some(age) = older_than {
            let created = chrono::DateTime::parse_from_rfc3339(&l.created)
                .map(|t| t.with_timezone(&chrono::Utc));
            let young = match created {
                Ok(t) => now.signed_duration_since(t).to_std().unwrap_or_default() < age,
                Err(_) => false,
            };
            if young {
                plan.kept += 1;
                continue;
            }
        }
        plan.remove.push(l);
    }
    Ok(plan)
}

/// Removes what `plan` lists; returns (removed, skipped because in use).
pub fn apply(store: &Store, plan: &GcPlan) -> Result<(usize, Vec<String>)> {
    let mut removed = 0;
    let mut busy = Vec::new();
    for l in &plan.remove {
        match store.try_lock(&l.key)? {
            Some(lock) => {
                if store.contains(&l.key) {
                    store.remove_object(&lock)?;
                    removed += 1;
                }
            }
            None => busy.push(l.key.clone()),
        }
    }
    Ok((removed, busy))
}
