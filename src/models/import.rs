//! Importing a pretrained ViT as the starting checkpoint (`defaults.pretrained` in a spec).
//!
//! The `import` step replaces the `pretrain` step: it reads a checkpoint file, infers the
//! architecture from its tensor shapes, and writes `model.safetensors` + `config.json` in
//! the layout the pretrain step writes, so stage 1 (f_p truncation) and finetuning (a new
//! head) use it unchanged. Its key hashes the file's blake3 digest.
//!
//! Inputs:
//! * a timm-layout ViT safetensors file (`VisionTransformer` state-dict names: `cls_token`,
//!   `pos_embed`, `patch_embed.proj.weight|bias`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
//!   mlp.fc1,mlp.fc2}.weight|bias`, `norm.weight|bias`), as `ieu-bench export` writes and
//!   timm saves; float32, float16 or bfloat16;
//! * a PyTorch `.pth` checkpoint (`torch.save`), e.g. SiT's ViT-S/16: the state dict is
//!   taken from the top level or from the first of `teacher`, `student`, `model`,
//!   `state_dict`, `model_state_dict` that holds tensors (or the spec's `checkpoint_key`),
//!   with any `module.` / `backbone.` prefixes stripped.
//!
//! Only the backbone is imported: `head.*` and any other keys (SiT's reconstruction and
//! contrastive heads, `fc_norm`, …) are ignored, and the model gets a freshly initialised
//! SiT head, which every consumer replaces anyway. The architecture must be ieu-bench's ViT
//! (LayerNorm eps 1e-6, exact-erf GELU, attention scale head_dim^-0.5, qkv with bias, a
//! class token); checkpoints with LayerScale, qk-norm, register tokens or a pre-norm are
//! refused with the unexpected keys listed. The number of heads cannot be read from shapes: it is the spec's `heads:`,
//! else the scale's when the widths agree, else dim/64 (timm's ViT-S/B/L).
//!
//! Image size: the model runs at the scale's image size with the checkpoint's patch size.
//! When that gives a different patch grid than the checkpoint's position embeddings, they
//! are resampled **bilinearly** (align_corners = false, like `F.interpolate`); timm resamples
//! bicubically with antialiasing, so the resampled values differ slightly from timm's. The
//! class-token embedding is kept. The scale's image size must be a multiple of the patch size.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Named, VitConfig};
use crate::spec::ModelDims;

/// Keys looked into, in order, when a `.pth` file's top level holds no tensors.
pub const NESTED_KEYS: &[&str] = &[
    "teacher",
    "student",
    "model",
    "state_dict",
    "model_state_dict",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointFormat {
    Safetensors,
    Pth,
}

impl CheckpointFormat {
    /// By file extension: `.safetensors` or `.pth` / `.pt` / `.bin`.
    pub fn of(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("safetensors") => Ok(Self::Safetensors),
            Some("pth" | "pt" | "bin" | "ckpt") => Ok(Self::Pth),
            _ => bail!(
                "{}: unknown checkpoint format (expected .safetensors, or .pth/.pt for torch.save files)",
                path.display()
            ),
        }
    }
}

/// Parameters of the `import` step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportParams {
    /// blake3 of the checkpoint file.
    pub digest: String,
    pub format: CheckpointFormat,
    /// The nested state dict used (`.pth`), if any.
    pub checkpoint_key: Option<String>,
    /// The architecture read from the file (heads resolved as documented above).
    pub model: ModelDims,
    /// Image size of the checkpoint's position embeddings.
    pub checkpoint_image_size: usize,
    /// The scale's image size the model runs at.
    pub image_size: usize,
    /// Seed of the fresh head.
    pub seed: u64,
}

impl ImportParams {
    pub fn vit_config(&self) -> VitConfig {
        VitConfig {
            image_size: self.image_size,
            patch_size: self.model.patch_size,
            dim: self.model.dim,
            depth: self.model.depth,
            heads: self.model.heads,
            mlp_ratio: self.model.mlp_ratio,
            num_classes: 2,
        }
    }
}

fn f32_from(dtype: safetensors::tensor::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use safetensors::tensor::Dtype::*;
    Some(match dtype {
        F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        F16 => {
            // Through the .pth reader's converter (same IEEE half format).
            return Some(super::pth::half_values(data));
        }
        _ => return None,
    })
}

/// Reads a checkpoint's tensors under timm backbone names (prefixes stripped, other keys
/// dropped), and which nested state dict they came from.
pub fn read_backbone(
    path: &Path,
    format: CheckpointFormat,
    key: Option<&str>,
) -> Result<(Named, Option<String>)> {
    let (all, used_key) = read_stripped(path, format, key)?;
    Ok((
        all.into_iter().filter(|(n, _)| is_backbone(n)).collect(),
        used_key,
    ))
}

/// Whether a (prefix-stripped) tensor name belongs to the ViT backbone. `norm_pre`,
/// register tokens and unknown block parameters count, so that [`infer`] can refuse ViT
/// variants whose forward pass differs from ours.
pub fn is_backbone(n: &str) -> bool {
    matches!(n, "cls_token" | "pos_embed" | "reg_token")
        || n.starts_with("patch_embed.")
        || n.starts_with("blocks.")
        || n.starts_with("norm.")
        || n.starts_with("norm_pre.")
}

/// Every float tensor of a checkpoint (the chosen nested state dict of a `.pth`), with
/// `module.` / `backbone.` prefixes stripped, and which nested state dict was used.
pub fn read_stripped(
    path: &Path,
    format: CheckpointFormat,
    key: Option<&str>,
) -> Result<(Named, Option<String>)> {
    let (all, used_key) = match format {
        CheckpointFormat::Safetensors => {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow!("cannot read checkpoint {}: {e}", path.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| anyhow!("{} is not a safetensors file: {e}", path.display()))?;
            let mut named = Named::new();
            for (name, view) in st.tensors() {
                if let Some(v) = f32_from(view.dtype(), view.data()) {
                    named.insert(name, (view.shape().to_vec(), v));
                }
            }
            (named, key.map(String::from))
        }
        CheckpointFormat::Pth => {
            let all = super::pth::read(path)?;
            select(all, key).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
    };
    let mut out = Named::new();
    for (name, t) in all {
        let mut n = name.as_str();
        if let Some(k) = &used_key {
            match n.strip_prefix(k.as_str()).and_then(|r| r.strip_prefix('.')) {
                Some(r) => n = r,
                None if format == CheckpointFormat::Pth => continue,
                None => {}
            }
        }
        loop {
            match n
                .strip_prefix("module.")
                .or_else(|| n.strip_prefix("backbone."))
            {
                Some(r) => n = r,
                None => break,
            }
        }
        out.insert(n.to_string(), t);
    }
    Ok((out, used_key))
}

/// The nested state dict of a flattened `.pth` (`teacher.module.backbone.x` → `teacher`).
fn select(all: Named, key: Option<&str>) -> Result<(Named, Option<String>)> {
    let top_level = |n: &str| {
        let mut n = n;
        while let Some(r) = n
            .strip_prefix("module.")
            .or_else(|| n.strip_prefix("backbone."))
        {
            n = r;
        }
        n == "pos_embed" || n == "cls_token"
    };
    let has = |k: &str| all.keys().any(|n| n.starts_with(&format!("{k}.")));
    let chosen = match key {
        Some(k) if has(k) => Some(k.to_string()),
        Some(k) => bail!(
            "checkpoint_key '{k}' holds no tensors (top-level keys: {})",
            top_keys(&all)
        ),
        None if all.keys().any(|n| top_level(n)) => None,
        None => NESTED_KEYS.iter().find(|k| has(k)).map(|k| k.to_string()),
    };
    Ok((all, chosen))
}

fn top_keys(all: &Named) -> String {
    let mut keys: Vec<&str> = all
        .keys()
        .map(|k| k.split('.').next().unwrap_or(k))
        .collect();
    keys.dedup();
    keys.join(", ")
}

/// The architecture of timm-named backbone tensors: (dims without heads, grid side).
pub struct Inferred {
    pub dim: usize,
    pub depth: usize,
    pub patch_size: usize,
    pub mlp_ratio: usize,
    pub grid: usize,
}

/// Infers the architecture from tensor shapes; errors list missing keys and bad shapes.
pub fn infer(t: &Named, origin: &str) -> Result<Inferred> {
    let shape = |k: &str| t.get(k).map(|(s, _)| s.as_slice());
    let Some(&[dim, 3, p, p2]) = shape("patch_embed.proj.weight") else {
        bail!(
            "{origin}: no ViT patch embedding `patch_embed.proj.weight` [dim, 3, p, p] \
             (backbone keys found: {})",
            list(t)
        );
    };
    if p != p2 {
        bail!("{origin}: non-square patches {p}x{p2}");
    }
    let mut depth = 0;
    while t.contains_key(&format!("blocks.{depth}.attn.qkv.weight")) {
        depth += 1;
    }
    if depth == 0 {
        bail!(
            "{origin}: no transformer blocks `blocks.0.attn.qkv.weight` (backbone keys found: {})",
            list(t)
        );
    }
    let hidden = shape("blocks.0.mlp.fc1.weight").map(|s| s[0]).unwrap_or(0);
    if hidden == 0 || hidden % dim != 0 {
        bail!(
            "{origin}: `blocks.0.mlp.fc1.weight` must be [k·{dim}, {dim}] (found {:?})",
            shape("blocks.0.mlp.fc1.weight")
        );
    }
    let tokens = match shape("pos_embed") {
        Some(&[1, n, d]) if d == dim => n,
        other => bail!("{origin}: `pos_embed` must be [1, 1 + grid², {dim}] (found {other:?})"),
    };
    let grid = ((tokens - 1) as f64).sqrt().round() as usize;
    if tokens < 2 || grid * grid != tokens - 1 {
        bail!("{origin}: `pos_embed` has {tokens} tokens, not 1 class token + a square grid");
    }
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, dim]),
        ("patch_embed.proj.bias".into(), vec![dim]),
        ("norm.weight".into(), vec![dim]),
        ("norm.bias".into(), vec![dim]),
    ];
    for b in 0..depth {
        for (k, s) in [
            ("norm1.weight", vec![dim]),
            ("norm1.bias", vec![dim]),
            ("attn.qkv.weight", vec![3 * dim, dim]),
            ("attn.qkv.bias", vec![3 * dim]),
            ("attn.proj.weight", vec![dim, dim]),
            ("attn.proj.bias", vec![dim]),
            ("norm2.weight", vec![dim]),
            ("norm2.bias", vec![dim]),
            ("mlp.fc1.weight", vec![hidden, dim]),
            ("mlp.fc1.bias", vec![hidden]),
            ("mlp.fc2.weight", vec![dim, hidden]),
            ("mlp.fc2.bias", vec![dim]),
        ] {
            want.push((format!("blocks.{b}.{k}"), s));
        }
    }
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (k, s) in &want {
        match shape(k) {
            None => missing.push(k.clone()),
            Some(got) if got != s.as_slice() => wrong.push(format!("{k}: {got:?}, expected {s:?}")),
            Some(_) => {}
        }
    }
    super::timm::check_keys(
        &format!("{origin}: not a timm ViT backbone of width {dim} and depth {depth}"),
        &missing,
        &wrong,
    )?;
    let known = |k: &str| {
        k == "pos_embed" || k == "patch_embed.proj.weight" || want.iter().any(|(w, _)| w == k)
    };
    let extra: Vec<&str> = t.keys().map(String::as_str).filter(|k| !known(k)).collect();
    if !extra.is_empty() {
        bail!(
            "{origin}: unsupported ViT variant (LayerScale, qk-norm, register tokens, a \
             pre-norm or more blocks than the ones found): unexpected keys {}",
            extra.join(", ")
        );
    }
    Ok(Inferred {
        dim,
        depth,
        patch_size: p,
        mlp_ratio: hidden / dim,
        grid,
    })
}

fn list(t: &Named) -> String {
    if t.is_empty() {
        return "none".into();
    }
    let mut k: Vec<&str> = t.keys().map(String::as_str).collect();
    let more = k.len().saturating_sub(30);
    k.truncate(30);
    let mut s = k.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// Plans an import: reads the file's shapes and resolves the architecture.
pub fn plan_params(
    path: &Path,
    digest: String,
    checkpoint_key: Option<&str>,
    heads: Option<usize>,
    scale: &crate::spec::Scale,
    seed: u64,
) -> Result<ImportParams> {
    let format = CheckpointFormat::of(path)?;
    let origin = path.display().to_string();
    let (t, key) = read_backbone(path, format, checkpoint_key)?;
    let a = infer(&t, &origin)?;
    let heads = match heads {
        Some(h) => h,
        None if a.dim == scale.model.dim => scale.model.heads,
        None if a.dim % 64 == 0 => a.dim / 64,
        None => bail!(
            "{origin}: cannot tell the number of attention heads of a {}-wide ViT: set \
             `pretrained: {{ path: ..., heads: H }}` in the spec",
            a.dim
        ),
    };
    if heads == 0 || a.dim % heads != 0 {
        bail!("{origin}: {heads} heads do not divide the width {}", a.dim);
    }
    if scale.image_size % a.patch_size != 0 {
        bail!(
            "{origin}: the scale's image size {} is not a multiple of the checkpoint's patch size {}",
            scale.image_size,
            a.patch_size
        );
    }
    Ok(ImportParams {
        digest,
        format,
        checkpoint_key: key,
        model: ModelDims {
            patch_size: a.patch_size,
            dim: a.dim,
            depth: a.depth,
            heads,
            mlp_ratio: a.mlp_ratio,
        },
        checkpoint_image_size: a.grid * a.patch_size,
        image_size: scale.image_size,
        seed,
    })
}

/// Bilinear resampling (align_corners = false) of a [g·g, d] grid to [n·n, d].
pub fn resample_grid(v: &[f32], g: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * n * d];
    let scale = g as f64 / n as f64;
    let coord = |i: usize| {
        let x = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let x0 = (x.floor() as usize).min(g - 1);
        let x1 = (x0 + 1).min(g - 1);
        (x0, x1, (x - x0 as f64) as f32)
    };
    for y in 0..n {
        let (y0, y1, wy) = coord(y);
        for x in 0..n {
            let (x0, x1, wx) = coord(x);
            for c in 0..d {
                let at = |yy: usize, xx: usize| v[(yy * g + xx) * d + c];
                let top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
                let bot = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
                out[(y * n + x) * d + c] = top * (1.0 - wy) + bot * wy;
            }
        }
    }
    out
}

/// Runs the `import` step: writes `model.safetensors`, `config.json` and `import.json`.
pub fn run_import_step(
    p: &ImportParams,
    path: &Path,
    out: &Path,
    device: &Device,
) -> Result<String> {
    let digest = crate::store::digest_file(path)?.blake3;
    if digest != p.digest {
        bail!("{} changed since planning; run again", path.display());
    }
    let origin = path.display().to_string();
    let (mut t, _) = read_backbone(path, p.format, p.checkpoint_key.as_deref())?;
    let a = infer(&t, &origin)?;
    let cfg = p.vit_config();
    let n = cfg.image_size / cfg.patch_size;
    let mut note = format!(
        "imported {} ({} blocks, width {}, {} heads, patch {})",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        cfg.depth,
        cfg.dim,
        cfg.heads,
        cfg.patch_size
    );
    if n != a.grid {
        let (shape, v) = t.remove("pos_embed").unwrap();
        let d = shape[2];
        let mut new = v[..d].to_vec();
        new.extend(resample_grid(&v[d..], a.grid, n, d));
        t.insert("pos_embed".into(), (vec![1, n * n + 1, d], new));
        note.push_str(&format!(
            "; position embeddings resampled bilinearly from {0}x{0} to {1}x{1} patches",
            a.grid, n
        ));
    }
    let vit = super::timm::from_timm(&t, &cfg, Some(p.seed ^ 0x4EAD), device, &origin)?;
    super::save_vit(&vit, &cfg, out)?;
    let info = serde_json::json!({
        "source": path.display().to_string(),
        "blake3": digest,
        "note": note,
    });
    crate::store::write_json(&out.join("import.json"), &info)?;
    Ok(note)
}

#[cfg(test)]
mod tests;
