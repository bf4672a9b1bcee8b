//! `run` (locally or on Slurm), `status` and `exec-step`: computing a spec's steps.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use super::share::report_refused;
use super::{Common, ExecutorKind, SlurmArgs, human_bytes};
use crate::dag::exec::Executor;
use crate::spec::LoadedSpec;
use crate::store::Store;

/// Loads the spec and plans it. `run` opens (creating) the store first, so the plan can use
/// its data-file digest cache; `report` needs an existing store.
pub(super) fn load(
    common: &Common,
    lenient: bool,
) -> Result<(LoadedSpec, crate::spec::Scale, crate::dag::Plan, Store)> {
    let mut spec = LoadedSpec::load(common.spec.as_deref())?;
    spec.apply_only(&common.only)?;
    let scale = spec.scale(&common.scale)?;
    let store = if lenient {
        Store::open_existing(&common.store)?
    } else {
        Store::open(&common.store)?
    };
    crate::store::stat_cache::attach(store.root());
    let plan = crate::spec::plan::plan_seeds(
        &spec,
        &scale,
        common.data_dir.as_deref(),
        &common.seeds,
        lenient,
    )?;
    if let Err(e) = crate::store::stat_cache::save() {
        tracing::warn!("cannot save the data-file digest cache: {e:#}");
    }
    Ok((spec, scale, plan, store))
}

/// `ieu-bench run`.
pub(super) fn run(
    common: Common,
    dry_run: bool,
    pull: Option<String>,
    executor: ExecutorKind,
    slurm: SlurmArgs,
) -> Result<()> {
    let t0 = Instant::now();
    let (spec, scale, plan, store) = load(&common, false)?;
    let cached = plan.steps.iter().filter(|s| store.contains(&s.key)).count();
    let total = plan.steps.len();
    if dry_run {
        let seeds = plan.seeds();
        let over = match seeds.as_slice() {
            [_] => String::new(),
            many => format!(
                " (over seeds {})",
                many.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        println!(
            "spec {} at scale {}: {} grid cells{over}",
            spec.origin,
            common.scale,
            plan.cells.len()
        );
        for s in &plan.steps {
            let state = if store.contains(&s.key) {
                "cached"
            } else {
                "to run"
            };
            println!(
                "  {:<8} {}  {:<9} {}",
                state,
                s.short(),
                s.kind.name(),
                s.label
            );
        }
        println!(
            "plan: {total} steps, {cached} cached, {} to run",
            total - cached
        );
        return Ok(());
    }
    crate::spec::check_memory(&scale)?;
    if let Some(name) = pull {
        let name = (!name.is_empty()).then_some(name.as_str());
        let (rname, url) = crate::store::remote::choose(store.root(), name)?;
        let remote = crate::store::remote::Remote::open(&rname, &url, false)?;
        let keys: Vec<String> = plan.steps.iter().map(|s| s.key.clone()).collect();
        let rep = crate::store::share::pull(&store, &remote, &keys, false)?;
        eprintln!(
            "pulled {} objects ({}) from {}; {} already here, {} not on the remote",
            rep.fetched,
            human_bytes(rep.bytes),
            remote.describe(),
            rep.present,
            rep.absent.len()
        );
        report_refused(&rep)?;
    }
    let stale = store.sweep_stale()?;
    if stale > 0 {
        tracing::info!("removed {stale} staging directories left by killed runs");
    }
    if executor == ExecutorKind::Slurm {
        return run_on_slurm(&common, &plan, &store, &slurm);
    }
    let jobs = common.jobs.unwrap_or_else(crate::default_jobs);
    let exec = Executor::new(store.clone(), common.data_dir.clone(), jobs)
        .with_threads(common.threads.unwrap_or_else(crate::default_jobs));
    let summary = exec.run(&plan)?;
    let mut df = crate::report::collect(&plan, &store)?;
    println!("{}", crate::report::to_csv(&mut df)?.trim_end());
    let mut extra = String::new();
    if summary.reused > 0 {
        extra.push_str(&format!(
            ", {} computed by a concurrent run and reused",
            summary.reused
        ));
    }
    if summary.recomputed > 0 {
        extra.push_str(&format!(
            ", {} damaged objects quarantined and recomputed",
            summary.recomputed
        ));
    }
    println!(
        "done: {total} steps, {} run, {} cached{extra}, {:.1}s",
        summary.ran,
        summary.cached,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `run --executor slurm`: submit what is neither stored nor queued, optionally wait.
fn run_on_slurm(
    common: &Common,
    plan: &crate::dag::Plan,
    store: &Store,
    args: &SlurmArgs,
) -> Result<()> {
    use crate::dag::slurm;
    let gpu_kinds = match &args.gpu_kinds {
        None => slurm::SlurmOptions::default_gpu_kinds(&common.scale),
        Some(names) => names
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| {
                serde_json::from_value::<crate::dag::Kind>(serde_json::Value::String(n.clone()))
                    .map_err(|_| anyhow::anyhow!("--gpu-kinds: unknown step kind '{n}'"))
            })
            .collect::<Result<_>>()?,
    };
    let opts = slurm::SlurmOptions {
        partition: args.partition.clone(),
        account: args.account.clone(),
        qos: args.qos.clone(),
        time: args.time.clone(),
        sbatch_args: args.sbatch_args.clone(),
        gpu_kinds,
    };
    let plan_file = slurm::write_plan(store, plan, common.data_dir.as_deref())?;
    let sub = slurm::submit(store, plan, &plan_file, &opts)?;
    println!(
        "slurm: submitted {} jobs, {} already queued or running, {} steps already stored",
        sub.new, sub.already_queued, sub.cached
    );
    for (key, id) in &sub.jobs {
        println!("  job {id}  {}", &key[..12]);
    }
    if !args.wait {
        return Ok(());
    }
    slurm::wait(store, plan)?;
    let mut df = crate::report::collect(plan, store)?;
    println!("{}", crate::report::to_csv(&mut df)?.trim_end());
    println!(
        "done: {} steps on the cluster, all stored",
        plan.steps.len()
    );
    Ok(())
}

/// `ieu-bench status`.
pub(super) fn status(common: Common) -> Result<()> {
    let (_spec, _scale, plan, store) = load(&common, true)?;
    let p = crate::dag::slurm::progress(&store, &plan)?;
    println!("{p}");
    for (label, key, id, log) in &p.failed {
        println!(
            "  failed: {label} ({}) job {id}, log {}",
            &key[..12],
            log.display()
        );
    }
    Ok(())
}

/// `ieu-bench exec-step`.
pub(super) fn exec_step(key: String, plan: PathBuf, store: PathBuf) -> Result<()> {
    let store = Store::open_existing(&store)?;
    let (step, data_dir) = crate::dag::slurm::read_step(&plan, &key)?;
    let one = crate::dag::Plan::of_steps(vec![step]);
    let summary = Executor::new(store, data_dir, 1).run(&one)?;
    println!(
        "exec-step {}: {}",
        &key[..12.min(key.len())],
        if summary.ran == 1 {
            "computed"
        } else {
            "already stored"
        }
    );
    Ok(())
}
