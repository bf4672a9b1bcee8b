//! `logits`, `export`, `preview` and `bench`: tools around models and attacks.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::store_cmds::resolve_in_store;

/// `ieu-bench logits`.
pub(super) fn logits(
    checkpoint: PathBuf,
    input: PathBuf,
    out: Option<PathBuf>,
    heads: Option<usize>,
    checkpoint_key: Option<String>,
) -> Result<()> {
    let (shape, x) =
        crate::attacks::read_npy(&input).with_context(|| format!("--input {}", input.display()))?;
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

/// `ieu-bench export`.
pub(super) fn export(hash: String, out: PathBuf, store: PathBuf) -> Result<()> {
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

/// `ieu-bench preview`.
pub(super) fn preview(
    out: PathBuf,
    dataset: String,
    data_dir: Option<PathBuf>,
    scale: String,
    attacks: Vec<String>,
    index: usize,
) -> Result<()> {
    let scale = crate::spec::load_scale(
        crate::spec::DEFAULT_SCALES,
        "<embedded experiments/scales.yaml>",
        &scale,
    )?;
    let r = crate::report::preview::render(&dataset, data_dir.as_deref(), &scale, &attacks, index)?;
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

/// `ieu-bench bench`.
pub(super) fn bench(scale: String, steps: usize, threads: usize) -> Result<()> {
    let scale = crate::spec::load_scale(
        crate::spec::DEFAULT_SCALES,
        "<embedded experiments/scales.yaml>",
        &scale,
    )?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| anyhow::anyhow!("--threads {threads}: {e}"))?;
    let (train, infer) = pool.install(|| -> Result<_> {
        Ok((
            crate::train::bench::train_throughput(&scale, steps)?,
            crate::train::bench::inference_throughput(&scale, steps)?,
        ))
    })?;
    println!("{train}");
    println!("{infer}");
    Ok(())
}
