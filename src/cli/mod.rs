//! Command-line interface.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::dag::exec::Executor;
use crate::spec::LoadedSpec;
use crate::store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "ieu-bench",
    version,
    about = "Reproducible benchmark of the IEU backdoor defence for vision transformers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Experiment spec (YAML). Default: the embedded experiments/default.yaml (synthetic data).
    pub spec: Option<PathBuf>,
    /// Scale: smoke (tests, seconds), cpu (default, minutes per cell on 2 cores), paper (224², ViT-S/16; GPU).
    #[arg(long, default_value = "cpu")]
    pub scale: String,
    /// Content-addressed artefact store.
    #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
    pub store: PathBuf,
    /// Where datasets are looked up: DIR/cifar-10-batches-bin, DIR/GTSRB, DIR/tiny-imagenet-200;
    /// for the grid entry `imagefolder`, DIR/train/<class>/ and DIR/test/<class>/.
    #[arg(long, env = "IEU_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Restrict a grid axis, e.g. --only attack=badnets-white,blended (repeatable).
    #[arg(long = "only", value_name = "AXIS=V1,V2")]
    pub only: Vec<String>,
    /// Steps computed at once (default: the number of CPU cores; 1 on a GPU). Results do not
    /// depend on it.
    #[arg(long, env = "IEU_JOBS")]
    pub jobs: Option<usize>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

/// Slurm job options (`--executor slurm`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SlurmArgs {
    #[arg(long)]
    pub partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub qos: Option<String>,
    /// Time limit of each job (sbatch --time).
    #[arg(long)]
    pub time: Option<String>,
    /// Extra sbatch argument for every job (repeatable), e.g. --sbatch-arg=--mem=8G.
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Kinds that ask for a GPU (--gres=gpu:1); default: the training kinds at the
    /// `paper` scale, none otherwise.
    #[arg(long = "gpu-kinds", value_delimiter = ',')]
    pub gpu_kinds: Option<Vec<String>>,
    /// Wait until every job has ended (progress on stderr); fail naming failed steps.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum RemoteAction {
    /// Add (or replace) a remote: a directory, file:///DIR, or s3://BUCKET/PREFIX.
    Add { name: String, url: String },
    /// List the configured remotes.
    List,
    /// Forget a remote.
    Remove { name: String },
}

/// How spec targets are planned (for push, pull, bundle).
#[derive(clap::Args, Debug, Clone)]
pub struct Selection {
    #[arg(long, default_value = "cpu")]
    pub scale: String,
    #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
    pub store: PathBuf,
    #[arg(long, env = "IEU_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long = "only", value_name = "AXIS=V1,V2")]
    pub only: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ShareArgs {
    /// An optional remote (a configured name or a URL), then specs (YAML files) or step
    /// hashes; default remote: IEU_REMOTE, the only one, or `origin`; default target: the
    /// embedded default spec.
    pub words: Vec<String>,
    #[command(flatten)]
    pub sel: Selection,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Markdown,
    Csv,
    /// A booktabs table to `\input` (best bold, second best underlined).
    Latex,
    /// One standalone page: the table, the figures, the provenance.
    Html,
}

/// An error with a specific exit status (`check`: 1 regressed, 2 incomplete).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Plan a spec into steps and run those not yet in the store.
    Run {
        #[command(flatten)]
        common: Common,
        /// Print the plan and stop.
        #[arg(long)]
        dry_run: bool,
        /// First pull from a remote (default: IEU_REMOTE, the only one, or `origin`) what
        /// it has of the plan, then compute the rest.
        #[arg(long, value_name = "REMOTE", num_args = 0..=1, default_missing_value = "")]
        pull: Option<String>,
        /// Where steps run: here (`local`), or one Slurm job each (`slurm`).
        #[arg(long, value_enum, default_value = "local")]
        executor: ExecutorKind,
        #[command(flatten)]
        slurm: SlurmArgs,
    },
    /// Where a spec's steps stand on the cluster (done / running / pending / failed).
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// Compute one planned step (what a Slurm job runs).
    #[command(hide = true)]
    ExecStep {
        key: String,
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        store: PathBuf,
    },
    /// Render what the store holds for a spec.
    Report {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "markdown")]
        format: Format,
        /// Write the report to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Show each value's change against a baseline: a CSV from `report --format csv`,
        /// or `paper` (the spec's reference values).
        #[arg(long, value_name = "BASE")]
        compare: Option<String>,
        /// Compare with what another store holds for the same spec.
        #[arg(long, value_name = "DIR", conflicts_with = "compare")]
        compare_store: Option<PathBuf>,
        /// Write the spec's `figures:` here as PNG and SVG (HTML reports embed them anyway).
        #[arg(long, value_name = "DIR")]
        figures: Option<PathBuf>,
    },
    /// Regression gate: compare every cell the spec plans with a baseline; exit 0 when
    /// nothing regressed, 1 when something did, 2 when cells are missing or the baseline
    /// cannot be read.
    Check {
        #[command(flatten)]
        common: Common,
        /// A CSV from `report --format csv`, or `paper` (the spec's reference values).
        #[arg(long, value_name = "BASE", required_unless_present = "baseline_store")]
        baseline: Option<String>,
        /// Another store holding the same spec.
        #[arg(long, value_name = "DIR", conflicts_with = "baseline")]
        baseline_store: Option<PathBuf>,
        /// Tolerances in points: `asr=1,ca=1` (the default), or per cell
        /// `cifar10/*/ieu:asr=2` (repeatable; `*` matches any).
        #[arg(long = "tol")]
        tol: Vec<String>,
        /// Also write the result as JUnit XML.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Print a step's manifest (kind, parameters, inputs, output digests, duration, backend).
    Show {
        /// Step hash or a unique prefix of it.
        hash: String,
        #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
        store: PathBuf,
        /// Also re-hash the outputs and check them against the manifest.
        #[arg(long)]
        verify: bool,
    },
    /// Configure remotes: `remote add NAME URL` (a directory or s3://BUCKET/PREFIX),
    /// `remote list`, `remote remove NAME`.
    Remote {
        #[command(subcommand)]
        action: RemoteAction,
        #[arg(long, env = "IEU_STORE", default_value = "artifacts", global = true)]
        store: PathBuf,
    },
    /// Send the closure of a spec's stored steps (or of step hashes) to a remote; what the
    /// remote has is skipped. `push [REMOTE] [SPEC | HASH ...]`.
    Push {
        #[command(flatten)]
        share: ShareArgs,
    },
    /// Fetch the closure of a spec's steps (or of step hashes) from a remote, verifying
    /// every file before publishing it. `pull [REMOTE] [SPEC | HASH ...]`.
    Pull {
        #[command(flatten)]
        share: ShareArgs,
    },
    /// Write the closure of a spec's stored steps (or of step hashes) as one .tar.zst file.
    Bundle {
        /// Specs (YAML files) or step hashes; default: the embedded default spec.
        targets: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        sel: Selection,
    },
    /// Verify a bundle and import its objects into the store.
    Unbundle {
        file: PathBuf,
        #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
        store: PathBuf,
    },
    /// Remove the objects no kept spec needs. Prints what it would remove unless --delete.
    Gc {
        /// Specs whose steps (and everything they were computed from) are kept (repeatable).
        #[arg(long = "keep")]
        keep: Vec<PathBuf>,
        /// Only remove objects created longer ago than this (30d, 12h, 45m).
        #[arg(long)]
        older_than: Option<String>,
        /// List what would be removed and the space freed (the default).
        #[arg(long, conflicts_with = "delete")]
        dry_run: bool,
        /// Really remove.
        #[arg(long)]
        delete: bool,
        /// Scales the kept specs are planned at (repeatable; default: every scale).
        #[arg(long = "scale")]
        scales: Vec<String>,
        #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
        store: PathBuf,
        #[arg(long, env = "IEU_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Check every object of the store against its manifest; damaged ones are quarantined.
    /// Exits non-zero on any damage.
    Verify {
        #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
        store: PathBuf,
    },
    /// List what the store holds: kind, label, key, size, age, backend (oldest first).
    Ls {
        #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
        store: PathBuf,
        /// Only objects of this kind (dataset, poison, pretrain, stage1, finetune, …).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Write a stored model (pretrain, stage1 or finetune step) as timm-layout safetensors.
    Export {
        /// Step hash or a unique prefix of it.
        hash: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, env = "IEU_STORE", default_value = "artifacts")]
        store: PathBuf,
    },
    /// Run a ViT checkpoint (timm safetensors or .pth) on an input array as an import would
    /// load it, printing its logits (to compare with PyTorch on the same input).
    Logits {
        /// The checkpoint: timm-layout `.safetensors`, or a `.pth` / `.pt` from torch.save.
        checkpoint: PathBuf,
        /// float32 `.npy` array [B, 3, S, S] at the checkpoint's image size, normalised as
        /// the model expects (the same tensor given to PyTorch).
        #[arg(long)]
        input: PathBuf,
        /// Write the logits [B, C] (or pre-logits [B, d] without a head) as float32 `.npy`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Attention heads (shapes do not tell); default width/64 as timm's ViT-S/B/L.
        #[arg(long)]
        heads: Option<usize>,
        /// Nested state dict of a `.pth` (default: the top level, else teacher, student,
        /// model, state_dict, model_state_dict).
        #[arg(long)]
        checkpoint_key: Option<String>,
    },
    /// Draw every attack on a test image (clean, poisoned, amplified difference) into a PNG.
    Preview {
        /// Output PNG file.
        #[arg(long)]
        out: PathBuf,
        /// synthetic, cifar10, gtsrb, tinyimagenet or imagefolder (read from --data-dir).
        #[arg(long, default_value = "synthetic")]
        dataset: String,
        #[arg(long, env = "IEU_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Image size is the scale's.
        #[arg(long, default_value = "cpu")]
        scale: String,
        /// Attacks to draw (default: all implemented).
        #[arg(long = "attack")]
        attacks: Vec<String>,
        /// Index among the non-target test images.
        #[arg(long, default_value_t = 0)]
        index: usize,
    },
    /// Measure training-step throughput (images/s) of a scale's ViT on this backend.
    Bench {
        #[arg(long, default_value = "cpu")]
        scale: String,
        /// Timed training steps (after two warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
}

/// Loads the spec and plans it. `run` opens (creating) the store first, so the plan can use
/// its data-file digest cache; `report` needs an existing store.
fn load(
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
    let plan = if lenient {
        crate::spec::plan::plan_available(&spec, &scale, common.data_dir.as_deref())?
    } else {
        crate::spec::plan::plan(&spec, &scale, common.data_dir.as_deref())?
    };
    if let Err(e) = crate::store::stat_cache::save() {
        tracing::warn!("cannot save the data-file digest cache: {e:#}");
    }
    Ok((spec, scale, plan, store))
}

/// What `report` and `check` read: the spec, its plan (the grid entries that can be
/// planned), the store and the collected metrics.
fn load_report(
    common: &Common,
) -> Result<(
    LoadedSpec,
    crate::dag::Plan,
    Store,
    polars::prelude::DataFrame,
)> {
    let (mut spec, _scale, plan, store) = load(common, true)?;
    for s in &plan.skipped {
        let (axis, name) = s.split_once(' ').unwrap();
        spec.spec.grid.axis_mut(axis).unwrap().retain(|v| v != name);
    }
    if !plan.skipped.is_empty() {
        eprintln!(
            "note: not implemented yet or data not found, left out of the report: {}",
            plan.skipped.join(", ")
        );
    }
    let df = crate::report::collect(&plan, &store)?;
    Ok((spec, plan, store, df))
}

/// `paper` or a CSV file.
fn load_baseline(spec: &LoadedSpec, base: &str) -> Result<crate::report::Baseline> {
    if base == "paper" {
        crate::report::compare::from_paper(spec)
    } else {
        crate::report::compare::from_csv(std::path::Path::new(base))
    }
}

/// What another store holds for the same spec, planned the same way.
fn baseline_from_store(common: &Common, dir: &std::path::Path) -> Result<crate::report::Baseline> {
    let other = Common {
        store: dir.to_path_buf(),
        ..common.clone()
    };
    let (_, _, _, df) = load_report(&other)?;
    let mut cells = crate::report::values_by_cell(&df)?;
    cells.retain(|_, v| !v.is_empty());
    Ok(crate::report::Baseline {
        source: format!("store {}", dir.display()),
        cells,
    })
}

/// Opens an existing store (never creating one) and resolves a step hash or prefix in it.
fn resolve_in_store(root: &std::path::Path, hash: &str) -> Result<(Store, String)> {
    let store = Store::open_existing(root)?;
    let key = store.resolve(hash)?;
    Ok((store, key))
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

/// Errors for objects a pull refused.
fn report_refused(rep: &crate::store::share::PullReport) -> Result<()> {
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
        let plan = crate::spec::plan::plan_available(&loaded, &scale, sel.data_dir.as_deref())?;
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

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn human_age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            common,
            dry_run,
            pull,
            executor,
            slurm,
        } => {
            let t0 = Instant::now();
            let (spec, scale, plan, store) = load(&common, false)?;
            let cached = plan.steps.iter().filter(|s| store.contains(&s.key)).count();
            let total = plan.steps.len();
            if dry_run {
                println!(
                    "spec {} at scale {}: {} grid cells",
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
            let exec = Executor::new(store.clone(), common.data_dir.clone(), jobs);
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
        Command::Report {
            common,
            format,
            out,
            compare,
            compare_store,
            figures,
        } => {
            let (spec, plan, store, mut df) = load_report(&common)?;
            let mut html_figures = Vec::new();
            for fig in &spec.spec.figures {
                let panels = match crate::report::figures::panels(fig, &plan, &store) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("note: figure {} left out: {e:#}", fig.name);
                        continue;
                    }
                };
                let svg = match &figures {
                    Some(dir) => {
                        let svg = crate::report::figures::write(fig, &panels, dir)?;
                        eprintln!("wrote {0}/{1}.png and {0}/{1}.svg", dir.display(), fig.name);
                        svg
                    }
                    None if format == Format::Html => crate::report::figures::svg(fig, &panels)?,
                    None => continue,
                };
                html_figures.push(crate::report::HtmlFigure {
                    title: fig.title.clone(),
                    svg: Some(svg),
                    png_data_uri: None,
                });
            }
            let baseline = match (compare, compare_store) {
                (Some(b), _) => Some(load_baseline(&spec, &b)?),
                (None, Some(dir)) => Some(baseline_from_store(&common, &dir)?),
                (None, None) => None,
            };
            let table = crate::report::build_table(&df, &spec, &common.scale, baseline.as_ref())?;
            let text = match format {
                Format::Csv => crate::report::to_csv(&mut df)?,
                Format::Markdown => crate::report::to_markdown(&table)?,
                Format::Latex => crate::report::to_latex(&table)?,
                Format::Html => {
                    // The triggers of the table's attacks on a test image (Figures 4 and 5).
                    let mut names: Vec<String> = Vec::new();
                    for a in &spec.spec.grid.attack {
                        let base = spec.spec.attack_base(a).to_string();
                        if base != "none" && !names.contains(&base) {
                            names.push(base);
                        }
                    }
                    let dataset = &spec.spec.grid.dataset[0];
                    let scale = spec.scale(&common.scale)?;
                    match crate::report::preview::render(
                        dataset,
                        common.data_dir.as_deref(),
                        &scale,
                        &names,
                        0,
                    ) {
                        Ok(r) => {
                            use base64::Engine;
                            html_figures.push(crate::report::HtmlFigure {
                                title: format!(
                                    "The triggers on a {dataset} test image: clean, poisoned, amplified difference (Figures 4 and 5)"
                                ),
                                svg: None,
                                png_data_uri: Some(format!(
                                    "data:image/png;base64,{}",
                                    base64::engine::general_purpose::STANDARD.encode(&r.png)
                                )),
                            });
                        }
                        Err(e) => eprintln!("note: trigger grid left out: {e:#}"),
                    }
                    crate::report::to_html(&table, &html_figures)?
                }
            };
            match out {
                Some(p) => crate::store::write_atomic(&p, text.as_bytes())?,
                None => print!("{text}"),
            }
            Ok(())
        }
        Command::Check {
            common,
            baseline,
            baseline_store,
            tol,
            junit,
        } => {
            let tol = crate::report::compare::Tolerances::parse(&tol)?;
            let (spec, _plan, _store, df) = load_report(&common)?;
            let exit2 = |e: anyhow::Error| Exit {
                code: 2,
                message: format!("{e:#}"),
            };
            let paper = baseline.as_deref() == Some("paper");
            let base = match (&baseline, &baseline_store) {
                (Some(b), _) => load_baseline(&spec, b).map_err(exit2)?,
                (None, Some(dir)) => baseline_from_store(&common, dir).map_err(exit2)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let values = crate::report::values_by_cell(&df)?;
            let mut now = std::collections::BTreeMap::new();
            for row in 0..df.height() {
                let cell = crate::report::cell_name(&df, row)?;
                let computed = df.column("ca")?.f64()?.get(row).is_some();
                now.insert(cell.clone(), computed.then(|| values[&cell].clone()));
            }
            let checks = crate::report::compare::check(&now, &base, &tol, paper);
            let extra = crate::report::compare::unplanned(&now, &base);
            if !extra.is_empty() && !paper {
                eprintln!(
                    "note: {} cells of the baseline are not planned here and were not compared: {}",
                    extra.len(),
                    extra.join(", ")
                );
            }
            use crate::report::compare::Verdict;
            let count = |v: Verdict| checks.iter().filter(|c| c.verdict == v).count();
            let moved: Vec<_> = checks
                .iter()
                .filter(|c| c.verdict != Verdict::Unchanged)
                .collect();
            if !moved.is_empty() {
                println!(
                    "{:<40} {:<14} {:>9} {:>9} {:>8}  verdict",
                    "cell", "metric", "baseline", "now", "delta"
                );
                let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
                for c in &moved {
                    let verdict = match c.verdict {
                        Verdict::Regressed => format!("REGRESSED (tolerance {})", c.tolerance),
                        Verdict::Improved => "improved".into(),
                        Verdict::WithinTolerance => "within tolerance".into(),
                        Verdict::Missing => format!("MISSING: {}", c.note),
                        Verdict::Unchanged => "unchanged".into(),
                    };
                    println!(
                        "{:<40} {:<14} {:>9} {:>9} {:>8}  {verdict}",
                        c.cell,
                        c.metric,
                        f(c.baseline),
                        f(c.now),
                        c.delta
                            .map(|d| format!("{d:+.2}"))
                            .unwrap_or_else(|| "–".into())
                    );
                }
            }
            let (reg, missing) = (count(Verdict::Regressed), count(Verdict::Missing));
            println!(
                "check against {}: {} values compared: {reg} regressed, {} improved, {} within tolerance, {} unchanged, {missing} missing",
                base.source,
                checks.len(),
                count(Verdict::Improved),
                count(Verdict::WithinTolerance),
                count(Verdict::Unchanged)
            );
            if let Some(path) = junit {
                let xml = crate::report::compare::junit(
                    &checks,
                    &format!("ieu-bench check {}", spec.spec.name),
                )?;
                crate::store::write_atomic(&path, xml.as_bytes())?;
            }
            if missing > 0 {
                return Err(Exit {
                    code: 2,
                    message: format!("{missing} values could not be compared (cells missing here or in the baseline)"),
                }
                .into());
            }
            if reg > 0 {
                let cells: Vec<String> = checks
                    .iter()
                    .filter(|c| c.verdict == Verdict::Regressed)
                    .map(|c| format!("{} {}", c.cell, c.metric))
                    .collect();
                return Err(Exit {
                    code: 1,
                    message: format!("{reg} regressions: {}", cells.join(", ")),
                }
                .into());
            }
            Ok(())
        }
        Command::Show {
            hash,
            store,
            verify,
        } => {
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
        Command::Status { common } => {
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
        Command::ExecStep { key, plan, store } => {
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
        Command::Remote { action, store } => {
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
        Command::Push { share } => {
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
        Command::Pull { share } => {
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
        Command::Bundle { targets, out, sel } => {
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
        Command::Unbundle { file, store } => {
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
        Command::Gc {
            keep,
            older_than,
            dry_run: _,
            delete,
            scales,
            store,
            data_dir,
        } => {
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
                    match crate::spec::plan::plan(&loaded, &scale, data_dir.as_deref()) {
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
        Command::Verify { store } => {
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
        Command::Ls { store, kind } => {
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
        Command::Logits {
            checkpoint,
            input,
            out,
            heads,
            checkpoint_key,
        } => {
            let (shape, x) = crate::attacks::read_npy(&input)
                .with_context(|| format!("--input {}", input.display()))?;
            let device = burn::prelude::Device::flex();
            let r = crate::models::logits::run(
                &checkpoint,
                checkpoint_key.as_deref(),
                heads,
                (&shape, &x),
                &device,
            )?;
            let c = &r.config;
            println!(
                "{}: ViT {}x{} patch {}, width {}, depth {}, {} heads, MLP x{}; {} {:?}",
                checkpoint.display(),
                c.image_size,
                c.image_size,
                c.patch_size,
                c.dim,
                c.depth,
                c.heads,
                c.mlp_ratio,
                if r.logits {
                    "logits"
                } else {
                    "pre-logits (no head.weight in the checkpoint)"
                },
                r.shape
            );
            let cols = r.shape[1];
            for (i, row) in r.values.chunks(cols).enumerate().take(8) {
                let shown: Vec<String> = row.iter().take(10).map(|v| format!("{v:.6}")).collect();
                let more = if cols > 10 { " …" } else { "" };
                println!("  [{i}] {}{more}", shown.join(" "));
            }
            if let Some(out) = out {
                crate::models::logits::write_npy(&out, &r.shape, &r.values)?;
                println!("wrote {}", out.display());
            }
            Ok(())
        }
        Command::Export { hash, out, store } => {
            let (store, key) = resolve_in_store(&store, &hash)?;
            let dir = store.verified(&key)?;
            if !dir.join("model.safetensors").is_file() {
                let kind = store.manifest(&key)?.kind;
                bail!(
                    "step {key} is a {kind} step and holds no model (export pretrain, stage1 or finetune steps)"
                );
            }
            let device = burn::prelude::Device::flex();
            let (net, cfg) = crate::models::net::load_net(&dir, &device)?;
            crate::models::timm::export_net(&net, &cfg, &out)
                .with_context(|| format!("cannot export step {key}"))?;
            println!(
                "wrote {} (timm {} layout, {} blocks, {} classes)",
                out.display(),
                cfg.arch.name(),
                cfg.vit.depth,
                cfg.vit.num_classes
            );
            Ok(())
        }
        Command::Preview {
            out,
            dataset,
            data_dir,
            scale,
            attacks,
            index,
        } => {
            let scale = crate::spec::load_scale(
                crate::spec::DEFAULT_SCALES,
                "<embedded experiments/scales.yaml>",
                &scale,
            )?;
            let r = crate::report::preview::render(
                &dataset,
                data_dir.as_deref(),
                &scale,
                &attacks,
                index,
            )?;
            crate::store::write_atomic(&out, &r.png)?;
            println!(
                "wrote {} ({} attacks on {dataset} test image {}, {}x{})",
                out.display(),
                r.attacks,
                r.image,
                scale.image_size,
                scale.image_size
            );
            Ok(())
        }
        Command::Bench { scale, steps } => {
            let scale = crate::spec::load_scale(
                crate::spec::DEFAULT_SCALES,
                "<embedded experiments/scales.yaml>",
                &scale,
            )?;
            let r = crate::train::bench::train_throughput(&scale, steps)?;
            println!("{r}");
            Ok(())
        }
    }
}
