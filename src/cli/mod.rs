//! Command-line interface.

mod report;
mod run;
mod share;
mod store_cmds;
mod tools;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Plan the spec with these seeds in place of its `defaults.seed`, e.g. --seed 0,1,2:
    /// each seed draws its own data, poisoned set, checkpoint and training. With several,
    /// `report` shows each value as the mean ± the standard deviation over the seeds.
    #[arg(long = "seed", value_name = "N,N", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Steps computed at once (default: the number of CPU cores; 1 on a GPU). Results do not
    /// depend on it.
    #[arg(long, env = "IEU_JOBS")]
    pub jobs: Option<usize>,
    /// CPU threads the running steps share (default: the number of cores), in one
    /// work-stealing pool: a step that runs alone uses all of them, steps that run together
    /// share them. Results do not depend on it.
    #[arg(long, env = "IEU_THREADS")]
    pub threads: Option<usize>,
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
    /// The spec's seeds, as for `run --seed`.
    #[arg(long = "seed", value_name = "N,N", value_delimiter = ',')]
    pub seeds: Vec<u64>,
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
        /// Seeds the kept specs are planned with, as `run --seed 0,1,2` (default: each
        /// spec's own `defaults.seed`): the steps of other seeds are not kept.
        #[arg(long = "seed", value_name = "N,N", value_delimiter = ',')]
        seeds: Vec<u64>,
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
        /// CPU threads of the timed step (default: 1).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
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
        } => run::run(common, dry_run, pull, executor, slurm),
        Command::Report {
            common,
            format,
            out,
            compare,
            compare_store,
            figures,
        } => report::report(common, format, out, compare, compare_store, figures),
        Command::Check {
            common,
            baseline,
            baseline_store,
            tol,
            junit,
        } => report::check(common, baseline, baseline_store, tol, junit),
        Command::Show {
            hash,
            store,
            verify,
        } => store_cmds::show(hash, store, verify),
        Command::Status { common } => run::status(common),
        Command::ExecStep { key, plan, store } => run::exec_step(key, plan, store),
        Command::Remote { action, store } => share::remote(action, store),
        Command::Push { share } => share::push(share),
        Command::Pull { share } => share::pull(share),
        Command::Bundle { targets, out, sel } => share::bundle(targets, out, sel),
        Command::Unbundle { file, store } => share::unbundle(file, store),
        Command::Gc {
            keep,
            older_than,
            dry_run: _,
            delete,
            scales,
            seeds,
            store,
            data_dir,
        } => store_cmds::gc(keep, older_than, delete, scales, seeds, store, data_dir),
        Command::Verify { store } => store_cmds::verify(store),
        Command::Ls { store, kind } => store_cmds::ls(store, kind),
        Command::Logits {
            checkpoint,
            input,
            out,
            heads,
            checkpoint_key,
        } => tools::logits(checkpoint, input, out, heads, checkpoint_key),
        Command::Export { hash, out, store } => tools::export(hash, out, store),
        Command::Preview {
            out,
            dataset,
            data_dir,
            scale,
            attacks,
            index,
        } => tools::preview(out, dataset, data_dir, scale, attacks, index),
        Command::Bench {
            scale,
            steps,
            threads,
        } => tools::bench(scale, steps, threads),
    }
}
