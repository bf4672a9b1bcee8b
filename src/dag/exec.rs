//! Executing a plan: every step whose key is not in the store is computed into a staging
//! directory and published atomically; stored steps are skipped.

use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

use super::{Kind, Plan, Step};
use crate::store::{Manifest, Store};

pub struct Executor {
    store: Store,
    data_dir: Option<PathBuf>,
    jobs: usize,
}

#[derive(Debug, Default)]
pub struct RunSummary {
    pub ran: usize,
    pub cached: usize,
}

/// Scheduling state shared by the workers.
struct Sched<'a> {
    pending: Vec<&'a Step>,
    running: usize,
    ran: usize,
    failed: Option<anyhow::Error>,
}

impl Executor {
    /// `jobs` steps run at once; each step is single-threaded and seeded, so the results do
    /// not depend on `jobs`.
    pub fn new(store: Store, data_dir: Option<PathBuf>, jobs: usize) -> Self {
        Self {
            store,
            data_dir,
            jobs: jobs.max(1),
        }
    }

    pub fn run(&self, plan: &Plan) -> Result<RunSummary> {
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
            failed: None,
        });
        let wake = Condvar::new();
        std::thread::scope(|scope| {
            for _ in 0..self.jobs.min(total.max(1)) {
                scope.spawn(|| self.worker(&sched, &wake, total));
            }
        });
        let sched = sched.into_inner().unwrap();
        if let Some(e) = sched.failed {
            return Err(e);
        }
        Ok(RunSummary {
            ran: sched.ran,
            cached,
        })
    }

    fn worker(&self, sched: &Mutex<Sched>, wake: &Condvar, total: usize) {
        let device = crate::default_device();
        loop {
            let step = {
                let mut st = sched.lock().unwrap();
                loop {
                    if st.failed.is_some() || st.pending.is_empty() {
                        wake.notify_all();
                        return;
                    }
                    let ready = st
                        .pending
                        .iter()
                        .position(|s| s.inputs.values().all(|k| self.store.contains(k)));
                    match ready {
                        Some(i) => {
                            st.running += 1;
                            break st.pending.remove(i);
                        }
                        None if st.running == 0 => {
                            st.failed = Some(anyhow!(
                                "no step can run: inputs missing for {}",
                                st.pending[0].label
                            ));
                            wake.notify_all();
                            return;
                        }
                        None => st = wake.wait(st).unwrap(),
                    }
                }
            };
            let n = total - sched.lock().unwrap().pending.len();
            tracing::info!("[{n}/{total}] {} ({})", step.label, step.short());
            let res = self.execute(step, &device);
            let mut st = sched.lock().unwrap();
            st.running -= 1;
            match res {
                Ok(secs) => {
                    st.ran += 1;
                    tracing::info!("    {} done in {secs:.1}s", step.label);
                }
                Err(e) => {
                    if st.failed.is_none() {
                        st.failed = Some(e);
                    }
                }
            }
            wake.notify_all();
        }
    }

    /// Computes one step into a staging directory and publishes it; returns its duration.
    fn execute(&self, step: &Step, device: &burn::prelude::Device) -> Result<f64> {
        let t0 = Instant::now();
        let staging = self.store.stage()?;
        self.compute(step, staging.path(), device)
            .with_context(|| format!("step '{}' ({}) failed", step.label, step.short()))?;
        let manifest = Manifest {
            key: step.key.clone(),
            kind: step.kind.name().to_string(),
            label: step.label.clone(),
            kind_version: step.kind.version(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            params: step.params.clone(),
            inputs: step.inputs.clone(),
            outputs: Default::default(),
            duration_s: t0.elapsed().as_secs_f64(),
            backend: crate::backend_name().to_string(),
            created: chrono::Utc::now().to_rfc3339(),
        };
        self.store.publish(staging, manifest)?;
        Ok(t0.elapsed().as_secs_f64())
    }

    fn input(&self, step: &Step, role: &str) -> Result<PathBuf> {
        let key = step
            .inputs
            .get(role)
            .ok_or_else(|| anyhow!("step {} has no input '{role}'", step.label))?;
        Ok(self.store.object_dir(key))
    }

    fn compute(
        &self,
        step: &Step,
        out: &std::path::Path,
        dev: &burn::prelude::Device,
    ) -> Result<()> {
        match step.kind {
            Kind::Dataset => {
                let p: crate::data::DatasetParams = step.params()?;
                let data_dir = step.locators.get("data_dir").or(self.data_dir.as_ref());
                let root = step.locators.get("dataset_root").map(|p| p.as_path());
                let meta =
                    crate::data::run_dataset_step(&p, data_dir.map(|p| p.as_path()), root, out)?;
                tracing::info!(
                    "    {}: {} pretrain, {} tune, {} test images",
                    meta.name,
                    meta.pretrain,
                    meta.tune,
                    meta.test
                );
            }
            Kind::Poison => {
                let p: crate::attacks::PoisonParams = step.params()?;
                let dataset = self.input(step, "dataset")?;
                let n = match &p.attack {
                    crate::attacks::AttackParams::Issba(_) => {
                        crate::attacks::issba::run_issba_poison(
                            &p,
                            &dataset,
                            &self.input(step, "stegastamp")?,
                            out,
                            dev,
                        )?
                    }
                    crate::attacks::AttackParams::Cat(c) => {
                        let st = crate::attacks::cat::run_cat_poison(
                            &p,
                            c,
                            &dataset,
                            &self.input(step, "base")?,
                            &self.input(step, "stage1")?,
                            out,
                            dev,
                        )?;
                        tracing::info!(
                            "    CAT objective {:.3} -> {:.3} (u8 {:.3}); gate-flagged {:.1}% -> {:.1}%; mean l2 {:.2}/255",
                            st.objective_before,
                            st.objective_after_pgd,
                            st.objective_after_u8,
                            st.flagged_before_pct,
                            st.flagged_after_pct,
                            st.l2_mean
                        );
                        st.perturbed
                    }
                    _ => {
                        let files = crate::attacks::TriggerFiles {
                            trigger: step.locators.get("trigger_file").cloned(),
                            mask: step.locators.get("mask_file").cloned(),
                        };
                        crate::attacks::run_poison_step(&p, &dataset, &files, out)?
                    }
                };
                tracing::info!("    {} poisoned training images", n);
            }
            Kind::Stegastamp => {
                let p: crate::attacks::issba::StegaParams = step.params()?;
                let st = crate::attacks::issba::run_stegastamp_step(
                    &p,
                    &self.input(step, "dataset")?,
                    out,
                    dev,
                )?;
                tracing::info!(
                    "    secret bit accuracy {:.3} (held-out {:.3}, clean {:.3}); PSNR {:.1} dB, max l_inf {:.4}",
                    st.bit_acc_train,
                    st.bit_acc_heldout,
                    st.bit_acc_clean,
                    st.psnr_mean,
                    st.linf_max
                );
            }
            Kind::Pretrain => {
                let p: crate::train::PretrainParams = step.params()?;
                let acc =
                    crate::train::run_pretrain_step(&p, &self.input(step, "dataset")?, out, dev)?;
                tracing::info!("    pretrained checkpoint: {acc:.2}% clean test accuracy");
            }
            Kind::Import => {
                let p: crate::models::import::ImportParams = step.params()?;
                let path = step
                    .locators
                    .get("checkpoint")
                    .ok_or_else(|| anyhow!("import step {} has no checkpoint file", step.label))?;
                let note = crate::models::import::run_import_step(&p, path, out, dev)?;
                tracing::info!("    {note}");
            }
            Kind::Stage1 => {
                let p: crate::defences::ieu::Stage1Params = step.params()?;
                let poison = self.input(step, "poison")?;
                let dataset = self.dataset_of(&poison)?;
                crate::defences::ieu::run_stage1_step(
                    &p,
                    &dataset,
                    &poison,
                    &self.input(step, "pretrain")?,
                    out,
                    dev,
                )?;
            }
            Kind::Isolate => {
                let p: crate::defences::abl::IsolateParams = step.params()?;
                let poison = self.input(step, "poison")?;
                let dataset = self.dataset_of(&poison)?;
                let g = crate::defences::abl::run_isolate_step(
                    &p,
                    &dataset,
                    &poison,
                    &self.input(step, "pretrain")?,
                    out,
                    dev,
                )?;
                tracing::info!(
                    "    isolated {} images, {} of them poisoned",
                    g.poisoned_flagged + g.clean_flagged,
                    g.poisoned_flagged
                );
            }
            Kind::Finetune => {
                let p: crate::defences::FinetuneParams = step.params()?;
                let poison = self.input(step, "poison")?;
                let dataset = self.dataset_of(&poison)?;
                let pretrain = self.input(step, "pretrain")?;
                let optional = |role: &str| step.inputs.get(role).map(|k| self.store.object_dir(k));
                let (stage1, isolate, backdoored) = (
                    optional("stage1"),
                    optional("isolate"),
                    optional("backdoored"),
                );
                let inputs = crate::defences::FinetuneInputs {
                    dataset: &dataset,
                    poison: &poison,
                    pretrain: &pretrain,
                    stage1: stage1.as_deref(),
                    isolate: isolate.as_deref(),
                    backdoored: backdoored.as_deref(),
                };
                crate::defences::run_finetune_step(&p, &inputs, out, dev)?;
            }
            Kind::Evaluate => {
                let p: crate::metrics::EvalParams = step.params()?;
                let m = crate::metrics::run_evaluate_step(
                    &p,
                    &self.input(step, "finetune")?,
                    &self.input(step, "poison")?,
                    &self.input(step, "dataset")?,
                    out,
                    dev,
                )?;
                tracing::info!("    CA {:.2}%  ASR {:.2}%", m.ca, m.asr);
            }
        }
        Ok(())
    }

    /// The dataset step a poison step was made from (its recorded input).
    fn dataset_of(&self, poison_dir: &std::path::Path) -> Result<PathBuf> {
        let key = poison_dir
            .file_name()
            .and_then(|s| s.to_str())
            .ok_or_else(|| anyhow!("bad store path"))?;
        let m = self.store.manifest(key)?;
        let d = m
            .inputs
            .get("dataset")
            .ok_or_else(|| anyhow!("poison step {key} has no dataset input"))?;
        Ok(self.store.object_dir(d))
    }
}
