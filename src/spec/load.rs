//! Loading specs and scales: strict YAML with errors naming the file and field, the
//! scales file beside a spec, and `--only` grid filters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;

use super::{DEFAULT_SCALES, DEFAULT_SPEC, DEFAULT_SPEC_NAME, Scale, Spec, load_scale};

/// Deserialises YAML strictly; errors name the file and the field path.
pub fn parse_yaml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if path == "." || path.is_empty() || msg.contains(&path) {
            anyhow!("{file}: {msg}")
        } else {
            anyhow!("{file}: field `{path}`: {msg}")
        }
    })
}

/// A loaded, validated spec together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    /// File name used in messages.
    pub origin: String,
    /// Directory relative paths in the spec are resolved against.
    pub dir: PathBuf,
}

impl LoadedSpec {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (text, origin, dir) = match path {
            None => (
                DEFAULT_SPEC.to_string(),
                DEFAULT_SPEC_NAME.to_string(),
                PathBuf::from("."),
            ),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow!("cannot read spec {}: {e}", p.display()))?;
                let dir = p
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| ".".into());
                (text, p.display().to_string(), dir)
            }
        };
        Self::from_str(&text, &origin, dir)
    }

    pub fn from_str(text: &str, origin: &str, dir: PathBuf) -> Result<Self> {
        let spec: Spec = parse_yaml(text, origin)?;
        super::validate::validate_spec(&spec, origin)?;
        Ok(Self {
            spec,
            origin: origin.to_string(),
            dir,
        })
    }

    /// The scales file beside the spec if there is one, else the embedded copy.
    /// The names of the scales this spec can run at (its `scales.yaml` or the embedded one).
    pub fn scale_names(&self) -> Result<Vec<String>> {
        let (text, origin) = self.scales_text()?;
        let all: BTreeMap<String, serde_yaml_ng::Value> = parse_yaml(&text, &origin)?;
        Ok(all.into_keys().collect())
    }

    fn scales_text(&self) -> Result<(String, String)> {
        let beside = self.dir.join("scales.yaml");
        Ok(if beside.is_file() {
            let text = std::fs::read_to_string(&beside)
                .map_err(|e| anyhow!("cannot read {}: {e}", beside.display()))?;
            (text, beside.display().to_string())
        } else {
            (
                DEFAULT_SCALES.to_string(),
                "<embedded experiments/scales.yaml>".to_string(),
            )
        })
    }

    pub fn scale(&self, name: &str) -> Result<Scale> {
        let (text, origin) = self.scales_text()?;
        let scale = load_scale(&text, &origin, name)?;
        for ds in self.unknown_pretrain_datasets(&scale) {
            tracing::warn!(
                "{origin}: field `{name}.pretrain.epochs_per_dataset.{ds}`: '{ds}' is neither a \
                 built-in dataset ({}) nor one of this spec's `datasets:`, so it sets nothing \
                 here (a misspelt name?)",
                super::DATASETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(scale)
    }

    /// The names in the scale's `pretrain.epochs_per_dataset` that name no dataset this spec
    /// can use: not a built-in one and not in its `datasets:` (a scales file is shared by
    /// specs, so this warns rather than fails).
    pub fn unknown_pretrain_datasets(&self, scale: &Scale) -> Vec<String> {
        scale
            .pretrain
            .epochs_per_dataset
            .keys()
            .filter(|ds| {
                super::names::availability(super::DATASETS, ds).is_none()
                    && !self.spec.datasets.contains_key(ds.as_str())
            })
            .cloned()
            .collect()
    }

    /// Restricts grid axes: each filter is `AXIS=V1,V2`.
    pub fn apply_only(&mut self, filters: &[String]) -> Result<()> {
        for f in filters {
            let (axis, values) = f.split_once('=').ok_or_else(|| {
                anyhow!("--only {f}: expected AXIS=V1,V2 (axes: dataset, attack, defence)")
            })?;
            let axis = axis.trim();
            let list = self.spec.grid.axis_mut(axis).ok_or_else(|| {
                anyhow!("--only {f}: unknown axis '{axis}' (axes: dataset, attack, defence)")
            })?;
            let wanted: Vec<String> = values
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if wanted.is_empty() {
                bail!("--only {f}: no values given");
            }
            for w in &wanted {
                if !list.contains(w) {
                    bail!(
                        "--only {f}: '{w}' is not in grid.{axis} of {} (it has: {})",
                        self.origin,
                        list.join(", ")
                    );
                }
            }
            list.retain(|v| wanted.contains(v));
        }
        Ok(())
    }
}
