//! Steps, keys and plans.
//!
//! A step is a kind, canonical parameters and the keys of its input steps. Its key is the
//! blake3 hash of those together with the digest of the code that computes it (`build.rs`)
//! and the backend, so a step is a pure function of its key: the same key always names the same computation, and a key present in the
//! store is never recomputed.

pub mod exec;
pub mod kinds;
pub mod slurm;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read or generate a dataset; split it into pretrain / tune / test.
    Dataset,
    /// Apply an attack to the tune and test sets.
    Poison,
    /// Train ISSBA's StegaStamp-style encoder/decoder on clean images.
    Stegastamp,
    /// Train the clean starting checkpoint on the pretrain split.
    Pretrain,
    /// Import the starting checkpoint from a file (`defaults.pretrained`), instead of
    /// `Pretrain`; same outputs.
    Import,
    /// IEU stage 1: tune the shallow poisoned module f_p.
    Stage1,
    /// ABL's isolation: an LGA finetune and the lowest-loss r_isol fraction.
    Isolate,
    /// Finetune f_r under a defence.
    Finetune,
    /// CA, ASR and isolation metrics of a finetuned model.
    Evaluate,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Dataset => "dataset",
            Kind::Poison => "poison",
            Kind::Stegastamp => "stegastamp",
            Kind::Pretrain => "pretrain",
            Kind::Import => "import",
            Kind::Stage1 => "stage1",
            Kind::Isolate => "isolate",
            Kind::Finetune => "finetune",
            Kind::Evaluate => "evaluate",
        }
    }

    /// Whether the step's numbers depend on the compute backend (everything that runs a
    /// model, or may: the dataset step only decodes and splits).
    pub fn uses_backend(self) -> bool {
        !matches!(self, Kind::Dataset)
    }
}

/// Code identities computed from the source by `build.rs`.
pub mod code {
    include!(concat!(env!("OUT_DIR"), "/code_identity.rs"));
}

/// Which code identity computes a step: the kind's, for `finetune` the defence's, for
/// `poison` the attack module's, and for `dataset` the format module's.
pub fn identity_name(kind: Kind, params: &Value) -> String {
    // `params.<field>.name`: the attack or defence the step runs.
    let name = |field: &str| {
        params
            .get(field)
            .and_then(|v| v.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("?")
    };
    match kind {
        Kind::Poison => {
            let a = name("attack");
            let module = crate::attacks::registered(a).map_or(a, |a| a.module());
            format!("poison/{}", module.replace('_', "-"))
        }
        Kind::Finetune => format!("finetune/{}", name("defence")),
        Kind::Dataset => {
            let field = |f: &str| params.get(f).and_then(Value::as_str);
            let module = crate::data::Format::of(field("name").unwrap_or("?"), field("format"))
                .map_or("?", |f| f.module());
            format!("dataset/{module}")
        }
        k => k.name().to_string(),
    }
}

/// The blake3 digest of the code that computes a step (see `build.rs`).
pub fn code_digest(kind: Kind, params: &Value) -> &'static str {
    let name = identity_name(kind, params);
    code::IDENTITIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, d, _)| *d)
        .unwrap_or_else(|| panic!("no code identity `{name}` (give its kind roots in dag::kinds::KINDS, or register its defence)"))
}

#[derive(Debug, Clone)]
pub struct Step {
    pub kind: Kind,
    /// Human-readable name, e.g. `poison cifar10/blended`.
    pub label: String,
    pub params: Value,
    /// Input role -> key.
    pub inputs: BTreeMap<String, String>,
    /// Where to find files on this machine (data directories, trigger files). Not hashed:
    /// the content digests in `params` stand for them.
    pub locators: BTreeMap<String, PathBuf>,
    pub key: String,
}

impl Step {
    pub fn new<P: Serialize>(
        kind: Kind,
        label: impl Into<String>,
        params: &P,
        inputs: BTreeMap<String, String>,
    ) -> Result<Self> {
        let params = serde_json::to_value(params)?;
        let key = step_key(kind, &params, &inputs);
        Ok(Self {
            kind,
            label: label.into(),
            params,
            inputs,
            locators: BTreeMap::new(),
            key,
        })
    }

    pub fn with_locator(mut self, name: &str, path: PathBuf) -> Self {
        self.locators.insert(name.to_string(), path);
        self
    }

    pub fn params<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        Ok(serde_json::from_value(self.params.clone())?)
    }

    pub fn short(&self) -> &str {
        &self.key[..12]
    }
}

/// JSON with object keys sorted at every level, whatever map type serde_json uses.
pub fn canonical_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical_json).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// The key: blake3 of the kind, the digest of its code, the backend (for kinds whose
/// numbers depend on it), the canonical parameters and the input keys.
pub fn step_key(kind: Kind, params: &Value, inputs: &BTreeMap<String, String>) -> String {
    step_key_with(kind, code_digest(kind, params), params, inputs)
}

pub fn step_key_with(
    kind: Kind,
    code: &str,
    params: &Value,
    inputs: &BTreeMap<String, String>,
) -> String {
    let mut doc = serde_json::json!({
        "kind": kind.name(),
        "code": code,
        "params": params,
        "inputs": inputs,
    });
    if kind.uses_backend() {
        doc["backend"] = Value::String(crate::backend_name().to_string());
    }
    blake3::hash(canonical_json(&doc).as_bytes())
        .to_hex()
        .to_string()
}

/// One grid cell of a spec and the step whose metrics it reports.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub dataset: String,
    pub attack: String,
    pub defence: String,
    /// The spec's `defaults.seed` this cell was planned with (`--seed` plans several).
    pub seed: u64,
    pub evaluate: String,
}

impl Cell {
    pub fn axis(&self, axis: &str) -> &str {
        match axis {
            "dataset" => &self.dataset,
            "attack" => &self.attack,
            _ => &self.defence,
        }
    }
}

/// Steps in dependency order, each once, and the grid cells they serve.
#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub cells: Vec<Cell>,
    /// Grid entries left out because they are not implemented yet (report plans only).
    pub skipped: Vec<String>,
    seen: HashSet<String>,
}

impl Plan {
    /// A plan of exactly these steps (no cells), e.g. one step a cluster job computes.
    pub fn of_steps(steps: Vec<Step>) -> Self {
        let mut p = Plan::default();
        for s in steps {
            p.add(s);
        }
        p
    }

    /// Each step's key computed without code identity and backend: what the parameters and
    /// the DAG's shape alone determine. Tests pin these to catch refactors that change what
    /// a step is asked to compute (the real keys also move with every code change).
    pub fn structural_keys(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for s in &self.steps {
            let inputs: BTreeMap<String, String> = s
                .inputs
                .iter()
                .map(|(r, k)| (r.clone(), out.get(k).cloned().unwrap_or_else(|| k.clone())))
                .collect();
            let doc = serde_json::json!({
                "kind": s.kind.name(),
                "params": s.params,
                "inputs": inputs,
            });
            let key = blake3::hash(canonical_json(&doc).as_bytes())
                .to_hex()
                .to_string();
            out.insert(s.key.clone(), key);
        }
        out
    }

    /// Adds another plan's steps (each once) and cells: one spec planned with several seeds.
    pub fn merge(&mut self, other: Plan) {
        for s in other.steps {
            self.add(s);
        }
        self.cells.extend(other.cells);
        for s in other.skipped {
            if !self.skipped.contains(&s) {
                self.skipped.push(s);
            }
        }
    }

    /// The distinct seeds of the plan's cells, in the order planned.
    pub fn seeds(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for c in &self.cells {
            if !out.contains(&c.seed) {
                out.push(c.seed);
            }
        }
        out
    }

    /// Adds a step unless an identical one is already planned; returns its key.
    pub fn add(&mut self, step: Step) -> String {
        let key = step.key.clone();
        if self.seen.insert(key.clone()) {
            self.steps.push(step);
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_params_inputs_and_kind_but_not_map_order() {
        let a = serde_json::json!({"x": 1, "y": [1, 2], "z": {"b": 1, "a": 2}});
        let b: Value =
            serde_json::from_str(r#"{"z": {"a": 2, "b": 1}, "y": [1, 2], "x": 1}"#).unwrap();
        let none = BTreeMap::new();
        assert_eq!(
            step_key(Kind::Evaluate, &a, &none),
            step_key(Kind::Evaluate, &b, &none)
        );
        assert_ne!(
            step_key(Kind::Evaluate, &a, &none),
            step_key(Kind::Pretrain, &a, &none)
        );
        let c = serde_json::json!({"x": 2, "y": [1, 2], "z": {"b": 1, "a": 2}});
        assert_ne!(
            step_key(Kind::Evaluate, &a, &none),
            step_key(Kind::Evaluate, &c, &none)
        );
        let inp: BTreeMap<String, String> = [("data".to_string(), "k".to_string())].into();
        assert_ne!(
            step_key(Kind::Evaluate, &a, &none),
            step_key(Kind::Evaluate, &a, &inp)
        );
        assert_eq!(canonical_json(&b), r#"{"x":1,"y":[1,2],"z":{"a":2,"b":1}}"#);
    }

    /// Every registered attack's poison steps are keyed by its own module's code: both
    /// BadNets attacks by `poison/badnets`, Blended by `poison/blended`.
    #[test]
    fn each_attack_module_has_its_own_poison_identity() {
        let of = |name: &str| {
            let params = serde_json::json!({ "attack": { "name": name } });
            (
                identity_name(Kind::Poison, &params),
                code_digest(Kind::Poison, &params),
            )
        };
        for name in crate::attacks::names() {
            let (id, _) = of(name);
            assert!(
                code::IDENTITIES.iter().any(|(n, _, _)| *n == id),
                "{name}: no identity {id}"
            );
        }
        assert_eq!(of("badnets-white").0, "poison/badnets");
        assert_eq!(of("badnets-white"), of("badnets-pattern"));
        assert_eq!(of("blended").0, "poison/blended");
        assert_eq!(of("l2-inv").0, "poison/invisible-l2");
        assert_ne!(of("blended").1, of("badnets-white").1);
    }

    /// Each dataset format's steps are keyed by its own module's code: an imagefolder entry
    /// by `dataset/imagefolder`, CIFAR-10 by `dataset/cifar10`.
    #[test]
    fn each_dataset_format_has_its_own_identity() {
        let of = |name: &str, format: Option<&str>| {
            let mut params = serde_json::json!({ "name": name, "image_size": 32 });
            if let Some(f) = format {
                params["format"] = f.into();
            }
            (
                identity_name(Kind::Dataset, &params),
                code_digest(Kind::Dataset, &params),
            )
        };
        for name in ["synthetic", "cifar10", "gtsrb", "tinyimagenet"] {
            assert_eq!(of(name, None).0, format!("dataset/{name}"));
        }
        assert_eq!(of("mydata", Some("imagefolder")).0, "dataset/imagefolder");
        assert_ne!(of("synthetic", None).1, of("cifar10", None).1);
    }
}
