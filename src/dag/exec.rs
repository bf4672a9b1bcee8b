//! Executing a plan: every step whose key is not in the store is computed into a staging
//! directory and published atomically; stored steps are skipped.
//!
//! - **Verified inputs.** Before anything runs, every stored object the run will read (the
//!   inputs of the steps to run, transitively, and the evaluate steps whose metrics it
//!   prints) is checked against its manifest; a damaged one is quarantined and computed
//!   again like a missing one. A step also re-checks its inputs when it starts.
//! - **One computation per key.** A step runs only under its key's lock
//!   ([`Store::try_lock`]); another `run` on the same store that wants the same step waits
//!   for the lock, finds the published object and reuses it. Meanwhile its workers take
//!   other ready steps, so concurrent runs share the work.
//! - **Failures end cleanly.** An error or a panic inside a step stops that step (nothing is
//!   published), its dependents are not run, independent steps still run to the end, and
//!   [`Executor::run`] returns an error naming every failed step and the steps left out.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use super::{Plan, Step};
use crate::store::{Damaged, KeyLock, Manifest, Store};

pub struct Executor {
    store: Store,
    data_dir: Option<PathBuf>,
    jobs: usize,
    /// Threads shared by the steps that run at once (each step's CPU kernels run on a
    /// rayon pool of its share: all of them when it runs alone, one each when `jobs`
    /// steps are ready).
    threads: usize,
}

#[derive(Debug, Default)]
pub struct RunSummary {
    /// Steps computed by this run.
    pub ran: usize,
    /// Steps found in the store when the run started.
    pub cached: usize,
    /// Steps another run on the same store computed while this one waited for their lock.
    pub reused: usize,
    /// Stored objects found damaged, quarantined and computed again.
    pub recomputed: usize,
}

/// A step that failed, and why.
#[derive(Debug, Clone)]
pub struct StepFailure {
    pub label: String,
    pub key: String,
    pub message: String,
}

/// Scheduling state shared by the workers.
struct Sched<'a> {
    pending: Vec<&'a Step>,
    running: usize,
    ran: usize,
    reused: usize,
    recomputed: usize,
    failed: Vec<StepFailure>,
    /// Keys that failed or were left out because an input did.
    bad: HashSet<String>,
    not_run: Vec<String>,
    /// Times each key's inputs were found damaged at start (bounded retries).
    requeued: HashMap<String, usize>,
}

thread_local! {
    /// Inside a step, panics are reported by the executor, not by the default hook.
    static IN_STEP: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs a panic hook that keeps panics inside steps quiet: the executor reports each as
/// one error naming the step, with the panic's message and location (the backtrace goes to
/// the debug log, `RUST_LOG=debug`, when `RUST_BACKTRACE` is set). Panics elsewhere go to
/// the default hook.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_step = IN_STEP.with(|s| s.borrow().is_some());
        if in_step {
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            if std::env::var_os("RUST_BACKTRACE").is_some() {
                tracing::debug!("backtrace:\n{}", std::backtrace::Backtrace::force_capture());
            }
            IN_STEP.with(|s| *s.borrow_mut() = Some(at));
        } else {
            default(info);
        }
    }));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// An input of a step was found damaged when the step started (it has been quarantined).
#[derive(Debug, thiserror::Error)]
#[error("input {key} is damaged: {why}")]
struct InputDamaged {
    key: String,
    why: String,
}

/// Testing aid: `IEU_INJECT_FAULT=panic:WHAT` (or `error:WHAT`) makes every step whose kind
/// or label contains WHAT panic (or fail) when it starts, to exercise failure handling
/// from the outside (the CLI tests use it).
fn inject_fault(step: &Step) -> Result<()> {
    let Ok(v) = std::env::var("IEU_INJECT_FAULT") else {
        return Ok(());
    };
    let Some((how, what)) = v.split_once(':') else {
        return Ok(());
    };
    if what.is_empty() || !(step.kind.name() == what || step.label.contains(what)) {
        return Ok(());
    }
    match how {
        "panic" => panic!("injected fault (IEU_INJECT_FAULT={v})"),
        "error" => bail!("injected fault (IEU_INJECT_FAULT={v})"),
        _ => Ok(()),
    }
}

impl Executor {
    /// `jobs` steps run at once; each step is single-threaded and seeded, so the results do
    /// not depend on `jobs`.
    pub fn new(store: Store, data_dir: Option<PathBuf>, jobs: usize) -> Self {
        Self {
            store,
            data_dir,
            jobs: jobs.max(1),
            threads: crate::default_jobs(),
        }
    }

    /// Sets the thread budget the running steps share (default: one per core). The steps
    /// run in one work-stealing pool of that many threads: a step that runs alone uses all
    /// of them, and when one of several ends the others take over its threads.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Checks the stored objects this run will read; quarantines damaged ones (they are then
    /// missing, and computed again). Returns how many were damaged.
    fn verify_reads(&self, plan: &Plan, by_key: &HashMap<&str, &Step>) -> usize {
        let mut damaged = 0;
        loop {
            let missing: Vec<&Step> = plan
                .steps
                .iter()
                .filter(|s| !self.store.contains(&s.key))
                .collect();
            // What the run reads: inputs of missing steps (transitively) and the metrics of
            // the grid cells.
            let mut need: Vec<&str> = plan.cells.iter().map(|c| c.evaluate.as_str()).collect();
            let mut seen: HashSet<&str> = HashSet::new();
            let mut stack: Vec<&str> = missing
                .iter()
                .flat_map(|s| s.inputs.values().map(String::as_str))
                .collect();
            while let Some(k) = stack.pop() {
                if !seen.insert(k) {
                    continue;
                }
                need.push(k);
                if let Some(s) = by_key.get(k) {
                    stack.extend(s.inputs.values().map(String::as_str));
                }
            }
            let mut changed = false;
            for k in need {
                if !self.store.contains(k) {
                    continue;
                }
                if let Err(e) = self.store.verified(k) {
                    tracing::warn!("{e:#}");
                    damaged += 1;
                    changed = true;
                }
            }
            if !changed {
                return damaged;
            }
        }
    }

    pub fn run(&self, plan: &Plan) -> Result<RunSummary> {
        let by_key: HashMap<&str, &Step> = plan.steps.iter().map(|s| (s.key.as_str(), s)).collect();
        let recomputed = self.verify_reads(plan, &by_key);
        let todo: Vec<&Step> = plan
            .steps
            .iter()
            .filter(|s| !self.store.contains(&s.key))
            .collect();
        let cached = plan.steps.len() - todo.len();
        let total = todo.len();
        tracing::info!(
            "{} steps: {} cached, {} to run ({} at a time)",
            plan.steps.len(),
            cached,
            total,
            self.jobs
        );
        let sched = Mutex::new(Sched {
            pending: todo,
            running: 0,
            ran: 0,
            reused: 0,
            recomputed,
            failed: Vec::new(),
            bad: HashSet::new(),
            not_run: Vec::new(),
            requeued: HashMap::new(),
        });
        let wake = Condvar::new();
        // Every thread of the pool reports panics through the executor (the hook stays
        // quiet there), and each step catches its own.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("ieu-step-{i}"))
            .start_handler(|_| IN_STEP.with(|s| *s.borrow_mut() = Some(String::new())))
            .build()
            .map_err(|e| anyhow!("cannot start {} threads for the steps: {e}", self.threads))?;
        tracing::info!(
            "up to {} step{} at once, sharing {} thread{}",
            self.jobs,
            if self.jobs == 1 { "" } else { "s" },
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        );
        std::thread::scope(|scope| {
            for _ in 0..self.jobs.min(total.max(1)) {
                scope.spawn(|| self.worker(&sched, &wake, total, &by_key, &pool));
            }
        });
        let st = sched.into_inner().unwrap();
        match self.store.sweep_stale() {
            Ok(n) if n > 0 => tracing::info!("removed {n} staging directories left by killed runs"),
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot sweep stale staging directories: {e:#}"),
        }
        if !st.failed.is_empty() {
            let mut msg = String::new();
            for f in &st.failed {
                msg.push_str(&format!(
                    "step '{}' ({}) failed: {}\n",
                    f.label,
                    &f.key[..12],
                    f.message
                ));
            }
            if st.not_run.is_empty() {
                msg.push_str(&format!(
                    "{} other steps ran to the end; nothing else was left out",
                    st.ran
                ));
            } else {
                msg.push_str(&format!(
                    "not run, because a step they depend on failed: {}; {} independent steps ran to the end",
                    st.not_run.join(", "),
                    st.ran
                ));
            }
            bail!("{msg}");
        }
        Ok(RunSummary {
            ran: st.ran,
            cached,
            reused: st.reused,
            recomputed: st.recomputed,
        })
    }

    /// Removes pending steps that depend on a failed (or left-out) step, transitively.
    fn prune(st: &mut Sched) {
        loop {
            let before = st.pending.len();
            let mut i = 0;
            while i < st.pending.len() {
                let s = st.pending[i];
                if s.inputs.values().any(|k| st.bad.contains(k)) {
                    st.bad.insert(s.key.clone());
                    st.not_run.push(s.label.clone());
                    st.pending.remove(i);
                } else {
                    i += 1;
                }
            }
            if st.pending.len() == before {
                return;
            }
        }
    }

    fn worker<'a>(
        &self,
        sched: &Mutex<Sched<'a>>,
        wake: &Condvar,
        total: usize,
        by_key: &HashMap<&str, &'a Step>,
        pool: &rayon::ThreadPool,
    ) {
        let device = crate::default_device();
        loop {
            let (step, lock) = {
                let mut st = sched.lock().unwrap();
                loop {
                    Self::prune(&mut st);
                    if st.pending.is_empty() {
                        wake.notify_all();
                        return;
                    }
                    let mut held_elsewhere = false;
                    let mut pick = None;
                    let mut lock_error = None;
                    for (i, s) in st.pending.iter().enumerate() {
                        if !s.inputs.values().all(|k| self.store.contains(k)) {
                            continue;
                        }
                        match self.store.try_lock(&s.key) {
                            Ok(Some(lock)) => {
                                pick = Some((i, lock));
                                break;
                            }
                            Ok(None) => held_elsewhere = true,
                            Err(e) => {
                                lock_error = Some((i, e));
                                break;
                            }
                        }
                    }
                    if let Some((i, e)) = lock_error {
                        let s = st.pending.remove(i);
                        st.bad.insert(s.key.clone());
                        st.failed.push(StepFailure {
                            label: s.label.clone(),
                            key: s.key.clone(),
                            message: format!("{e:#}"),
                        });
                        continue;
                    }
                    if let Some((i, lock)) = pick {
                        let s = st.pending.remove(i);
                        if self.store.contains(&s.key) {
                            // Another run computed it while we waited for its lock.
                            tracing::info!(
                                "    {} ({}): computed by another run, reused",
                                s.label,
                                s.short()
                            );
                            st.reused += 1;
                            drop(lock);
                            wake.notify_all();
                            continue;
                        }
                        st.running += 1;
                        break (s, lock);
                    }
                    if st.running == 0 && !held_elsewhere {
                        // Nothing runs here or elsewhere, and no pending step is ready.
                        let pending = std::mem::take(&mut st.pending);
                        for s in pending {
                            let missing: Vec<&str> = s
                                .inputs
                                .values()
                                .filter(|k| !self.store.contains(k))
                                .map(|k| &k[..12])
                                .collect();
                            st.bad.insert(s.key.clone());
                            st.failed.push(StepFailure {
                                label: s.label.clone(),
                                key: s.key.clone(),
                                message: format!(
                                    "its inputs {} are neither stored nor planned",
                                    missing.join(", ")
                                ),
                            });
                        }
                        wake.notify_all();
                        return;
                    }
                    // Wait for our own steps to finish, or for another run's locks.
                    st = wake.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
                }
            };
            let n = {
                let st = sched.lock().unwrap();
                st.ran + st.reused + st.failed.len() + st.running
            };
            tracing::info!("[{n}/{total}] {} ({})", step.label, step.short());
            let (res, at) = pool.install(|| {
                IN_STEP.with(|s| *s.borrow_mut() = Some(String::new()));
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    self.execute(step, &device, &lock)
                }));
                let at = IN_STEP.with(|s| s.borrow_mut().replace(String::new()));
                (r, at.unwrap_or_default())
            });
            drop(lock);
            let res = match res {
                Ok(r) => r,
                Err(payload) => Err(anyhow!("panicked{at}: {}", panic_message(&*payload))),
            };
            let mut st = sched.lock().unwrap();
            st.running -= 1;
            match res {
                Ok(secs) => {
                    st.ran += 1;
                    tracing::info!("    {} done in {secs:.1}s", step.label);
                }
                Err(e) => match e.downcast_ref::<InputDamaged>() {
                    Some(d) if st.requeued.get(&step.key).copied().unwrap_or(0) < 2 => {
                        tracing::warn!("{e:#}; computing it again");
                        *st.requeued.entry(step.key.clone()).or_default() += 1;
                        st.recomputed += 1;
                        if let Some(input) = by_key.get(d.key.as_str())
                            && !st.pending.iter().any(|s| s.key == input.key)
                        {
                            st.pending.push(input);
                        }
                        st.pending.push(step);
                    }
                    _ => {
                        tracing::error!("step '{}' ({}) failed: {e:#}", step.label, step.short());
                        st.bad.insert(step.key.clone());
                        st.failed.push(StepFailure {
                            label: step.label.clone(),
                            key: step.key.clone(),
                            message: format!("{e:#}"),
                        });
                    }
                },
            }
            wake.notify_all();
        }
    }

    /// Computes one step into a staging directory and publishes it; returns its duration.
    fn execute(&self, step: &Step, device: &burn::prelude::Device, lock: &KeyLock) -> Result<f64> {
        let t0 = Instant::now();
        for key in step.inputs.values() {
            if let Err(e) = self.store.verified(key) {
                if e.downcast_ref::<Damaged>().is_some() {
                    return Err(InputDamaged {
                        key: key.clone(),
                        why: format!("{e:#}"),
                    }
                    .into());
                }
                return Err(e);
            }
        }
        // Shared locks on the inputs while they are read: `gc` cannot remove them meanwhile.
        let mut reading = Vec::new();
        for key in step.inputs.values() {
            reading.push(self.store.lock_shared(key)?);
            if !self.store.contains(key) {
                return Err(InputDamaged {
                    key: key.clone(),
                    why: "it was removed from the store".into(),
                }
                .into());
            }
        }
        let staging = self.store.stage(lock)?;
        inject_fault(step)?;
        self.compute(step, staging.path(), device)?;
        let manifest = Manifest {
            key: step.key.clone(),
            kind: step.kind.name().to_string(),
            label: step.label.clone(),
            code_identity: super::identity_name(step.kind, &step.params),
            code: super::code_digest(step.kind, &step.params).to_string(),
            dependencies: super::code::NUMERIC_DEPENDENCIES.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            params: step.params.clone(),
            inputs: step.inputs.clone(),
            outputs: Default::default(),
            duration_s: t0.elapsed().as_secs_f64(),
            backend: crate::backend_name().to_string(),
            host: crate::store::host_name(),
            pid: std::process::id(),
            created: chrono::Utc::now().to_rfc3339(),
        };
        self.store.publish(staging, manifest)?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Runs a step's kind (the table in [`super::kinds`]) into `out`.
    fn compute(
        &self,
        step: &Step,
        out: &std::path::Path,
        dev: &burn::prelude::Device,
    ) -> Result<()> {
        let run = super::kinds::StepRun {
            step,
            store: &self.store,
            data_dir: self.data_dir.as_deref(),
            out,
            device: dev,
        };
        (super::kinds::of(step.kind).run)(&run)
    }
}
