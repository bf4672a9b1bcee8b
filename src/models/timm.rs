//! timm-layout safetensors for the ViT family.
//!
//! Names and shapes follow timm's `VisionTransformer`: `patch_embed.proj.weight`
//! `[d, 3, p, p]` (a stride-p convolution; ieu-bench's linear patch projection flattens
//! patches channel-major, which is exactly that kernel), `cls_token`, `pos_embed`,
//! `blocks.{i}.norm1.weight|bias`, `blocks.{i}.attn.qkv.weight` `[3d, d]`, `attn.proj`,
//! `norm2`, `mlp.fc1`, `mlp.fc2`, `norm.weight|bias`; Linear weights are `[out, in]`
//! (PyTorch), transposed from Burn's `[in, out]`. The SiT head ([CLS, mean] → fc1 → GELU →
//! fc2) has no timm counterpart and is written as `head.fc1.*`, `head.fc2.*`.
//!
//! DeiT III (`model: deit`) is timm's `deit3_*` layout: the same names plus LayerScale
//! `blocks.{i}.ls1.gamma` / `ls2.gamma`, a `pos_embed` over the patch tokens only
//! (`no_embed_class`), and a plain `head.weight|bias`. The other architectures have no timm
//! export here; their stored `model.safetensors` holds them under ieu-bench's names.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;

use burn::module::Module;

use super::deit::Deit;
use super::net::{Net, NetConfig};
use super::{Named, Vit, VitConfig, f32_values, named_params, write_named};

fn transpose(shape: &[usize], v: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (r, c) = (shape[0], shape[1]);
    let mut out = vec![0f32; v.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    (vec![c, r], out)
}

/// Burn name → timm name, and whether the tensor is a Linear weight (to transpose).
fn timm_name(burn: &str) -> (String, bool) {
    // DeiT III's LayerScale γ (ours: `gamma_1`, `gamma_2`) is timm's `ls1.gamma`, `ls2.gamma`.
    for (ours, theirs) in [(".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")] {
        if let Some(stem) = burn.strip_suffix(ours) {
            return (format!("{stem}{theirs}"), false);
        }
    }
    let mut n = burn.replace(".gamma", ".weight").replace(".beta", ".bias");
    if n.starts_with("patch_embed.") {
        n = n.replace("patch_embed.", "patch_embed.proj.");
    }
    let linear_weight =
        n.ends_with(".weight") && !n.contains("norm") && !n.starts_with("patch_embed");
    (n, linear_weight)
}

/// The model's parameters under timm names and layouts.
pub fn to_timm(vit: &Vit, cfg: &VitConfig) -> Named {
    to_timm_named(vit, cfg.dim, cfg.patch_size)
}

/// A ViT-family module's parameters under timm names; `dim` and `patch` shape the patch
/// projection's convolution kernel.
fn to_timm_named<M: Module>(m: &M, dim: usize, patch: usize) -> Named {
    let mut out = BTreeMap::new();
    for (name, (shape, v)) in named_params(m) {
        let (tname, lin) = timm_name(&name);
        let entry = if name == "patch_embed.weight" {
            // [3·p·p, d] → [d, 3, p, p]
            let (_, t) = transpose(&shape, &v);
            (vec![dim, 3, patch, patch], t)
        } else if lin {
            transpose(&shape, &v)
        } else {
            (shape, v)
        };
        out.insert(tname, entry);
    }
    out
}

/// Writes any stored model that has a timm layout (ViT, DeiT III); other architectures are
/// an error naming the ones that do.
pub fn export_net(net: &Net, cfg: &NetConfig, path: &Path) -> Result<()> {
    match net {
        Net::Vit(vit) => export(vit, &cfg.vit, path),
        Net::Deit(deit) => {
            let named = to_timm_named(deit, cfg.vit.dim, cfg.vit.patch_size);
            write_named(named, Some(metadata(cfg)?), path)
        }
        other => bail!(
            "a {} model has no timm layout in ieu-bench (export supports vit and deit); \
             the step's model.safetensors holds its weights under ieu-bench's names",
            other.arch().name()
        ),
    }
}

/// Reads a timm `deit3_*`-layout file (as [`export_net`] writes) into a DeiT III of `cfg`.
pub fn import_deit(path: &Path, cfg: &NetConfig, device: &Device) -> Result<Deit> {
    let t = super::read_safetensors(path)?;
    let origin = path.display().to_string();
    from_timm_named(
        Deit::new(cfg, 0, device),
        &t,
        false,
        device,
        &origin,
        "DeiT III",
    )
}

pub fn export(vit: &Vit, cfg: &VitConfig, path: &Path) -> Result<()> {
    write_named(to_timm(vit, cfg), Some(metadata(cfg)?), path)
}

/// safetensors metadata of an export: PyTorch's `format: pt` and the model's config.
fn metadata<C: serde::Serialize>(cfg: &C) -> Result<std::collections::HashMap<String, String>> {
    Ok(std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("ieu_bench_config".to_string(), serde_json::to_string(cfg)?),
    ]))
}

/// Reads a timm-layout file written by [`export`] back into a ViT of `cfg`.
pub fn import(path: &Path, cfg: &VitConfig, device: &Device) -> Result<Vit> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not safetensors", path.display()))?;
    let mut t: Named = BTreeMap::new();
    for (name, view) in st.tensors() {
        t.insert(name, (view.shape().to_vec(), f32_values(&view)));
    }
    from_timm(&t, cfg, None, device, &path.display().to_string())
}

/// A ViT of `cfg` from tensors under timm names. With `fresh_head: Some(seed)` the head is
/// freshly initialised from `seed` and `head.*` tensors are not read (imports of foreign
/// checkpoints); otherwise `head.fc1.*` / `head.fc2.*` must be present (our own exports).
/// Errors list every missing key and every wrong shape.
pub fn from_timm(
    t: &Named,
    cfg: &VitConfig,
    fresh_head: Option<u64>,
    device: &Device,
    origin: &str,
) -> Result<Vit> {
    let model = Vit::new(cfg, fresh_head.unwrap_or(0), device);
    let what = format!("ViT of {cfg:?}");
    from_timm_named(model, t, fresh_head.is_some(), device, origin, &what)
}

/// `model` with every parameter read from timm-named tensors `t` (`head.*` kept as
/// initialised when `keep_head`). Errors list every missing key and wrong shape.
fn from_timm_named<M: Module>(
    model: M,
    t: &Named,
    keep_head: bool,
    device: &Device,
    origin: &str,
    what: &str,
) -> Result<M> {
    let mut burn_named: Named = BTreeMap::new();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (name, (shape, init)) in named_params(&model) {
        if keep_head && name.starts_with("head.") {
            burn_named.insert(name, (shape, init));
            continue;
        }
        let (tname, lin) = timm_name(&name);
        let Some((tshape, v)) = t.get(&tname) else {
            missing.push(tname);
            continue;
        };
        let entry = if (name == "patch_embed.weight" || lin) && tshape.len() >= 2 {
            let (r, c) = (tshape[0], tshape[1..].iter().product());
            transpose(&[r, c], v)
        } else {
            (tshape.clone(), v.clone())
        };
        if entry.0 != shape {
            wrong.push(format!("{tname}: {tshape:?}"));
            continue;
        }
        burn_named.insert(name, entry);
    }
    check_keys(
        &format!("{origin}: does not fit a {what}"),
        &missing,
        &wrong,
    )?;
    super::load_named(model, burn_named, device, origin)
}

/// An error headed `what` listing missing keys and wrong shapes, if there are any.
pub fn check_keys(what: &str, missing: &[String], wrong: &[String]) -> Result<()> {
    if missing.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let mut msg = what.to_string();
    if !missing.is_empty() {
        msg.push_str(&format!("\n  missing keys: {}", missing.join(", ")));
    }
    if !wrong.is_empty() {
        msg.push_str(&format!("\n  wrong shapes: {}", wrong.join("; ")));
    }
    bail!(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8×8, two-block, 8-wide model with 3 classes.
    fn tiny() -> VitConfig {
        VitConfig {
            image_size: 8,
            patch_size: 4,
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 3,
        }
    }

    /// Two deterministic 8×8 RGB inputs.
    fn input(device: &Device) -> Tensor<4> {
        let v: Vec<f32> = (0..2 * 3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_data(TensorData::new(v, [2, 3, 8, 8]), device)
    }

    #[test]
    fn export_import_round_trip_gives_identical_logits() {
        let device = Device::flex();
        let cfg = tiny();
        let vit = Vit::new(&cfg, 11, &device);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        export(&vit, &cfg, &path).unwrap();
        let back = import(&path, &cfg, &device).unwrap();
        let x = input(&device);
        let a: Vec<f32> = vit.forward(x.clone()).to_data().try_to_vec().unwrap();
        let b: Vec<f32> = back.forward(x).to_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        let named = to_timm(&vit, &cfg);
        assert_eq!(named["patch_embed.proj.weight"].0, vec![8, 3, 4, 4]);
        assert_eq!(named["blocks.0.attn.qkv.weight"].0, vec![24, 8]);
        assert!(named.contains_key("blocks.1.norm1.weight") && named.contains_key("norm.bias"));
    }

    #[test]
    fn deit_exports_in_the_deit3_layout_and_round_trips() {
        let device = Device::flex();
        let cfg = NetConfig::new(super::super::net::Arch::Deit, tiny());
        let net = Net::new(&cfg, 5, &device);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        export_net(&net, &cfg, &path).unwrap();
        let t = super::super::read_safetensors(&path).unwrap();
        assert_eq!(t["blocks.1.ls2.gamma"].0, vec![8]);
        assert_eq!(
            t["pos_embed"].0,
            vec![1, 4, 8],
            "patch tokens only (no_embed_class)"
        );
        assert_eq!(t["head.weight"].0, vec![3, 8]);
        assert_eq!(t["patch_embed.proj.weight"].0, vec![8, 3, 4, 4]);
        assert!(
            !t.keys()
                .any(|k| k.contains("gamma_") || k.ends_with(".beta"))
        );
        let back = import_deit(&path, &cfg, &device).unwrap();
        let x = input(&device);
        let a: Vec<f32> = net.forward(x.clone()).to_data().try_to_vec().unwrap();
        let b: Vec<f32> = back.forward(x).to_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        // Architectures without a timm layout are a clear error.
        let cfg = NetConfig::new(super::super::net::Arch::Cait, cfg.vit.clone());
        let err = export_net(&Net::new(&cfg, 0, &device), &cfg, &path).unwrap_err();
        assert!(
            err.to_string().contains("cait model has no timm layout"),
            "{err}"
        );
    }
}
