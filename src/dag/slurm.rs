//! Running a plan on a Slurm cluster: every step that is not in the store becomes one job
//! (`ieu-bench exec-step KEY`), submitted with `sbatch --parsable` and
//! `--dependency=afterok:` the jobs of its inputs, so Slurm orders, places and cancels
//! (`--kill-on-invalid-dep=yes`) them. The plan is written once to the store
//! (`plans/<hash>.json`) and read by the jobs; the store must be on a filesystem every node
//! sees.
//!
//! Completion is decided by the store (a published object), never by accounting. A
//! submitted step leaves a marker `slurm/<key>.job` with its job id: re-running the same
//! command submits nothing for a step whose job is still queued or running, and submits
//! again a step whose job ended without publishing. The per-key lock keeps two jobs from
//! computing one step. Job logs go to `logs/<key>.out`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::{Kind, Plan, Step};
use crate::store::Store;

/// What jobs ask Slurm for.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
    /// Extra `sbatch` arguments for every job.
    pub sbatch_args: Vec<String>,
    /// Kinds that ask for a GPU (`--gres=gpu:1`).
    pub gpu_kinds: Vec<Kind>,
}

impl SlurmOptions {
    /// Training kinds ask for a GPU at the `paper` scale; data and poison steps never.
    pub fn default_gpu_kinds(scale: &str) -> Vec<Kind> {
        if scale == "paper" {
            vec![
                Kind::Pretrain,
                Kind::Stage1,
                Kind::Finetune,
                Kind::Isolate,
                Kind::Stegastamp,
            ]
        } else {
            Vec::new()
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredStep {
    kind: Kind,
    label: String,
    params: serde_json::Value,
    inputs: BTreeMap<String, String>,
    locators: BTreeMap<String, PathBuf>,
    key: String,
}

#[derive(Serialize, Deserialize)]
struct StoredPlan {
    data_dir: Option<PathBuf>,
    steps: Vec<StoredStep>,
}

/// Writes the plan into the store (content-addressed by its text); returns the file.
pub fn write_plan(store: &Store, plan: &Plan, data_dir: Option<&Path>) -> Result<PathBuf> {
    let stored = StoredPlan {
        data_dir: data_dir.map(|d| std::path::absolute(d).unwrap_or(d.to_path_buf())),
        steps: plan
            .steps
            .iter()
            .map(|s| StoredStep {
                kind: s.kind,
                label: s.label.clone(),
                params: s.params.clone(),
                inputs: s.inputs.clone(),
                locators: s
                    .locators
                    .iter()
                    .map(|(k, p)| (k.clone(), std::path::absolute(p).unwrap_or(p.clone())))
                    .collect(),
                key: s.key.clone(),
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&stored)?;
    let dir = store.root().join("plans");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", &blake3::hash(&text).to_hex()[..16]));
    if !path.is_file() {
        crate::store::write_atomic(&path, &text)?;
    }
    Ok(path)
}

/// Reads a plan written by [`write_plan`]: the one step `key` and the data directory.
pub fn read_step(path: &Path, key: &str) -> Result<(Step, Option<PathBuf>)> {
    let text =
        std::fs::read(path).with_context(|| format!("cannot read plan {}", path.display()))?;
    let stored: StoredPlan = serde_json::from_slice(&text)
        .with_context(|| format!("corrupt plan {}", path.display()))?;
    let s = stored
        .steps
        .into_iter()
        .find(|s| s.key == key)
        .ok_or_else(|| anyhow!("plan {} has no step {key}", path.display()))?;
    let step = Step {
        kind: s.kind,
        label: s.label,
        params: s.params,
        inputs: s.inputs,
        locators: s.locators,
        key: s.key,
    };
    // A plan written by another build (other code, other keys) must not run here.
    let expect = super::step_key(step.kind, &step.params, &step.inputs);
    if expect != step.key {
        bail!(
            "step {key} of plan {} was planned by another ieu-bench build (this one computes key {expect}); submit again",
            path.display()
        );
    }
    Ok((step, stored.data_dir))
}

fn marker(store: &Store, key: &str) -> PathBuf {
    store.root().join("slurm").join(format!("{key}.job"))
}

/// Log file of a step's job.
pub fn log_file(store: &Store, key: &str) -> PathBuf {
    store.root().join("logs").join(format!("{key}.out"))
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run {:?} (is Slurm installed and on PATH?)",
            cmd.get_program()
        )
    })?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// States (`PENDING`, `RUNNING`, …) of the given jobs that are still in the queue. The
/// whole queue is listed and filtered here: `squeue -j` fails outright on ids that have
/// left Slurm's memory, which would hide the live ones among them.
pub fn queue_states(ids: &[String]) -> Result<HashMap<String, String>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let text = run_cmd(Command::new("squeue").args(["-h", "-o", "%i %T"]))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(i, s)| (i.trim().to_string(), s.trim().to_string()))
        .filter(|(i, _)| ids.contains(i))
        .collect())
}

/// Step key -> job id of the plan's steps submitted before (their markers).
fn recorded_jobs(store: &Store, plan: &Plan) -> BTreeMap<String, String> {
    plan.steps
        .iter()
        .filter_map(|s| {
            let id = std::fs::read_to_string(marker(store, &s.key)).ok()?;
            Some((s.key.clone(), id.trim().to_string()))
        })
        .collect()
}

fn job_name(step: &Step) -> String {
    let label: String = step
        .label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("ieu-{}-{label}", step.short())
}

/// What `submit` did.
#[derive(Debug, Default)]
pub struct Submitted {
    /// Step key -> job id of every step not yet in the store.
    pub jobs: BTreeMap<String, String>,
    pub new: usize,
    pub already_queued: usize,
    pub cached: usize,
}

/// Submits every step of `plan` that is neither stored nor queued.
pub fn submit(
    store: &Store,
    plan: &Plan,
    plan_file: &Path,
    opts: &SlurmOptions,
) -> Result<Submitted> {
    std::fs::create_dir_all(store.root().join("slurm"))?;
    std::fs::create_dir_all(store.root().join("logs"))?;
    let exe = std::env::current_exe().context("cannot find the ieu-bench executable")?;
    let store_abs = std::path::absolute(store.root())?;
    let mut sub = Submitted::default();
    // Jobs of earlier submissions that are still queued or running.
    let recorded = recorded_jobs(store, plan);
    let live = queue_states(&recorded.values().cloned().collect::<Vec<_>>())?;
    for s in &plan.steps {
        if store.contains(&s.key) {
            sub.cached += 1;
            continue;
        }
        if let Some(id) = recorded.get(&s.key).filter(|id| live.contains_key(*id)) {
            sub.jobs.insert(s.key.clone(), id.clone());
            sub.already_queued += 1;
            continue;
        }
        let deps: Vec<&str> = s
            .inputs
            .values()
            .filter(|k| !store.contains(k))
            .map(|k| {
                sub.jobs.get(k).map(String::as_str).ok_or_else(|| {
                    anyhow!("input {k} of {} is neither stored nor submitted", s.label)
                })
            })
            .collect::<Result<_>>()?;
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", job_name(s)))
            .arg(format!("--output={}", log_file(store, &s.key).display()))
            .arg("--kill-on-invalid-dep=yes");
        if !deps.is_empty() {
            cmd.arg(format!("--dependency=afterok:{}", deps.join(":")));
        }
        for (flag, v) in [
            ("--partition", &opts.partition),
            ("--account", &opts.account),
            ("--qos", &opts.qos),
            ("--time", &opts.time),
        ] {
            if let Some(v) = v {
                cmd.arg(format!("{flag}={v}"));
            }
        }
        if opts.gpu_kinds.contains(&s.kind) {
            cmd.arg("--gres=gpu:1");
        }
        cmd.args(&opts.sbatch_args);
        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
        cmd.arg(format!(
            "--wrap={} exec-step {} --plan {} --store {}",
            quote(&exe),
            s.key,
            quote(plan_file),
            quote(&store_abs)
        ));
        let out = run_cmd(&mut cmd).with_context(|| format!("submitting {}", s.label))?;
        let id = out.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() {
            bail!("sbatch gave no job id for {}", s.label);
        }
        crate::store::write_atomic(&marker(store, &s.key), id.as_bytes())?;
        tracing::info!("submitted {} ({}) as job {id}", s.label, s.short());
        sub.jobs.insert(s.key.clone(), id);
        sub.new += 1;
    }
    Ok(sub)
}

/// Progress of a plan's steps on the cluster.
#[derive(Debug, Default, PartialEq)]
pub struct Progress {
    pub done: usize,
    pub running: usize,
    pub pending: usize,
    /// Steps whose job ended without publishing: (label, key, job id, log file).
    pub failed: Vec<(String, String, String, PathBuf)>,
    /// Steps with no job and no object.
    pub not_submitted: usize,
}

/// Where every step of `plan` stands: the store decides what is done.
pub fn progress(store: &Store, plan: &Plan) -> Result<Progress> {
    let ids = recorded_jobs(store, plan);
    let states = queue_states(&ids.values().cloned().collect::<Vec<_>>())?;
    let mut p = Progress::default();
    for s in &plan.steps {
        if store.contains(&s.key) {
            p.done += 1;
            continue;
        }
        match ids.get(&s.key) {
            Some(id) => match states.get(id).map(String::as_str) {
                Some("RUNNING") | Some("COMPLETING") | Some("CONFIGURING") => p.running += 1,
                Some(_) => p.pending += 1,
                None => p.failed.push((
                    s.label.clone(),
                    s.key.clone(),
                    id.clone(),
                    log_file(store, &s.key),
                )),
            },
            None => p.not_submitted += 1,
        }
    }
    Ok(p)
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} done, {} running, {} pending, {} failed",
            self.done,
            self.running,
            self.pending,
            self.failed.len()
        )?;
        if self.not_submitted > 0 {
            write!(f, ", {} not submitted", self.not_submitted)?;
        }
        Ok(())
    }
}

/// Waits until no step of `plan` is queued or running; fails naming every step whose job
/// ended without publishing it (with its log), and the steps that never ran because of it.
pub fn wait(store: &Store, plan: &Plan) -> Result<()> {
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        let p = progress(store, plan)?;
        let line = p.to_string();
        if line != last {
            eprintln!("slurm: {line} ({:.0}s)", t0.elapsed().as_secs_f64());
            last = line;
        }
        if p.running == 0 && p.pending == 0 {
            if p.failed.is_empty() && p.not_submitted == 0 {
                return Ok(());
            }
            let mut msg = String::new();
            let mut not_run = Vec::new();
            for (label, key, id, log) in &p.failed {
                // A job that started has a log; one cancelled because an input failed has none.
                if log.is_file() {
                    msg.push_str(&format!(
                        "step '{label}' ({}) failed (job {id}); log: {}\n",
                        &key[..12],
                        log.display()
                    ));
                } else {
                    not_run.push(label.as_str());
                }
            }
            if !not_run.is_empty() {
                msg.push_str(&format!(
                    "not run, because a step they depend on failed: {}\n",
                    not_run.join(", ")
                ));
            }
            if p.not_submitted > 0 {
                msg.push_str(&format!("{} steps were not submitted\n", p.not_submitted));
            }
            bail!("{}", msg.trim_end());
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
}
