//! `ieu-bench logits`: what ieu-bench computes from a foreign ViT checkpoint, so that an
//! import can be checked against PyTorch on the same input.
//!
//! The checkpoint (timm-layout safetensors or a `.pth`, read exactly as the `import` step
//! reads it: [`super::import`]) is loaded at its own image size into ieu-bench's ViT, and
//! the input — a float32 `.npy` array [B, 3, S, S], already normalised, the same tensor
//! given to the PyTorch model — is run through it. With a `head.weight` [C, d] (and
//! `head.bias`) in the file the result is timm's logits: the class token after the final
//! norm, times the head. Without one it is that class token (timm's
//! `forward_head(..., pre_logits=True)`). Checkpoints that pool by average (`fc_norm`) are
//! refused, since ieu-bench's ViT reads the class token.
//!
//! The numerics are timm's `VisionTransformer`: LayerNorm eps 1e-6, exact (erf) GELU,
//! attention scale head_dim^-0.5, qkv split as (3, heads, head_dim), position embeddings
//! added to the class token too. The test below checks them against a direct f64
//! transcription of timm's forward pass on timm-named tensors.

use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;

use super::VitConfig;
use super::import::{CheckpointFormat, infer, is_backbone, read_stripped};

/// What was computed.
pub struct Output {
    /// [B, C] (logits) or [B, d] (pre-logits).
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    /// Whether the checkpoint had a classification head (else: pre-logits).
    pub logits: bool,
    pub config: VitConfig,
}

/// Runs the checkpoint at `path` on `input` ([B, 3, S, S], NCHW, f32).
pub fn run(
    path: &Path,
    checkpoint_key: Option<&str>,
    heads: Option<usize>,
    input: (&[usize], &[f32]),
    device: &Device,
) -> Result<Output> {
    let origin = path.display().to_string();
    let format = CheckpointFormat::of(path)?;
    let (all, _) = read_stripped(path, format, checkpoint_key)?;
    if all.contains_key("fc_norm.weight") {
        bail!(
            "{origin}: has `fc_norm` (timm's global average pooling); ieu-bench's ViT \
             classifies from the class token"
        );
    }
    let backbone: super::Named = all
        .iter()
        .filter(|(n, _)| is_backbone(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let inf = infer(&backbone, &origin)?;
    let heads = heads.unwrap_or((inf.dim / 64).max(1));
    if heads == 0 || inf.dim % heads != 0 {
        bail!("--heads {heads} does not divide the width {}", inf.dim);
    }
    let size = inf.grid * inf.patch_size;
    let (shape, x) = input;
    if shape.len() != 4 || shape[0] == 0 || shape[1] != 3 || shape[2] != size || shape[3] != size {
        bail!(
            "input: expected a float32 array [B, 3, {size}, {size}] with B ≥ 1 (the \
             checkpoint's image size), found {shape:?}"
        );
    }
    let config = VitConfig {
        image_size: size,
        patch_size: inf.patch_size,
        dim: inf.dim,
        depth: inf.depth,
        heads,
        mlp_ratio: inf.mlp_ratio,
        num_classes: 1,
    };
    let vit = super::timm::from_timm(&backbone, &config, Some(0), device, &origin)?;
    let b = shape[0];
    let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [b, 3, size, size]), device);
    let d = inf.dim;
    let cls: Tensor<2> = vit.features(x).slice([0..b, 0..1]).reshape([b, d]);
    let head = match (all.get("head.weight"), all.get("head.bias")) {
        (Some((ws, w)), bias) if ws.len() == 2 && ws[1] == d => {
            let c = ws[0];
            let bias = match bias {
                Some((bs, v)) if bs.as_slice() == [c] => v.clone(),
                Some((bs, _)) => bail!("{origin}: `head.bias` is {bs:?}, expected [{c}]"),
                None => vec![0.0; c],
            };
            Some((c, w.clone(), bias))
        }
        (Some((ws, _)), _) => {
            bail!("{origin}: `head.weight` is {ws:?}, expected [classes, {d}]")
        }
        (None, _) => None,
    };
    let (out, logits) = match head {
        Some((c, w, bias)) => {
            // PyTorch Linear: y = x Wᵀ + b with W [C, d].
            let w = Tensor::<2>::from_data(TensorData::new(w, [c, d]), device);
            let bias = Tensor::<1>::from_data(TensorData::new(bias, [c]), device);
            (cls.matmul(w.transpose()) + bias.reshape([1, c]), true)
        }
        None => (cls, false),
    };
    let shape = out.dims().to_vec();
    let values = out
        .to_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(Output {
        shape,
        values,
        logits,
        config,
    })
}

/// Writes a float32 `.npy` array.
pub fn write_npy(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    use npyz::WriterBuilder;
    let mut bytes = Vec::new();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape.iter().map(|&s| s as u64).collect::<Vec<_>>())
        .writer(&mut bytes)
        .begin_nd()?;
    w.extend(values.iter().copied())?;
    w.finish()?;
    crate::store::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::models::{Named, Vit};

    /// timm's `VisionTransformer.forward` written out in f64 loops over timm-named tensors
    /// (conv patch embedding, cls + pos_embed, pre-norm blocks with LN eps 1e-6, qkv as
    /// (3, heads, head_dim), erf GELU, final norm, class token, head).
    fn timm_reference(t: &Named, x: &[f32], b: usize, s: usize, heads: usize) -> Vec<f64> {
        let g = |k: &str| -> &Vec<f32> { &t[k].1 };
        let (d, _, p, _) = {
            let sh = &t["patch_embed.proj.weight"].0;
            (sh[0], sh[1], sh[2], sh[3])
        };
        let grid = s / p;
        let n = grid * grid + 1;
        let hd = d / heads;
        let linear = |w: &[f32], bias: &[f32], v: &[f64], out: usize| -> Vec<f64> {
            let inn = v.len();
            (0..out)
                .map(|o| {
                    bias[o] as f64 + (0..inn).map(|i| w[o * inn + i] as f64 * v[i]).sum::<f64>()
                })
                .collect()
        };
        let ln = |v: &[f64], w: &[f32], bias: &[f32]| -> Vec<f64> {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / v.len() as f64;
            v.iter()
                .enumerate()
                .map(|(i, a)| (a - m) / (var + 1e-6).sqrt() * w[i] as f64 + bias[i] as f64)
                .collect()
        };
        let gelu = |a: f64| 0.5 * a * (1.0 + libm::erf(a / std::f64::consts::SQRT_2));
        let mut out = Vec::new();
        for img in 0..b {
            let px = |c: usize, y: usize, xx: usize| x[((img * 3 + c) * s + y) * s + xx] as f64;
            let mut tok: Vec<Vec<f64>> = vec![g("cls_token").iter().map(|&v| v as f64).collect()];
            for gy in 0..grid {
                for gx in 0..grid {
                    tok.push(
                        (0..d)
                            .map(|o| {
                                let mut acc = g("patch_embed.proj.bias")[o] as f64;
                                for c in 0..3 {
                                    for ky in 0..p {
                                        for kx in 0..p {
                                            acc += g("patch_embed.proj.weight")
                                                [((o * 3 + c) * p + ky) * p + kx]
                                                as f64
                                                * px(c, gy * p + ky, gx * p + kx);
                                        }
                                    }
                                }
                                acc
                            })
                            .collect(),
                    );
                }
            }
            for (i, v) in tok.iter_mut().enumerate() {
                for (j, a) in v.iter_mut().enumerate() {
                    *a += g("pos_embed")[i * d + j] as f64;
                }
            }
            let mut blk = 0;
            while t.contains_key(&format!("blocks.{blk}.norm1.weight")) {
                let k = |name: &str| g(&format!("blocks.{blk}.{name}"));
                let y: Vec<Vec<f64>> = tok
                    .iter()
                    .map(|v| ln(v, k("norm1.weight"), k("norm1.bias")))
                    .collect();
                let qkv: Vec<Vec<f64>> = y
                    .iter()
                    .map(|v| linear(k("attn.qkv.weight"), k("attn.qkv.bias"), v, 3 * d))
                    .collect();
                let mut att_out = vec![vec![0.0; d]; n];
                for h in 0..heads {
                    for q in 0..n {
                        let scores: Vec<f64> = (0..n)
                            .map(|m| {
                                (0..hd)
                                    .map(|i| qkv[q][h * hd + i] * qkv[m][d + h * hd + i])
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = scores.iter().map(|sc| (sc - mx).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for i in 0..hd {
                            att_out[q][h * hd + i] =
                                (0..n).map(|m| e[m] / z * qkv[m][2 * d + h * hd + i]).sum();
                        }
                    }
                }
                for (i, v) in tok.iter_mut().enumerate() {
                    let pr = linear(k("attn.proj.weight"), k("attn.proj.bias"), &att_out[i], d);
                    for j in 0..d {
                        v[j] += pr[j];
                    }
                    let y = ln(v, k("norm2.weight"), k("norm2.bias"));
                    let hidden = t[&format!("blocks.{blk}.mlp.fc1.bias")].1.len();
                    let h1: Vec<f64> = linear(k("mlp.fc1.weight"), k("mlp.fc1.bias"), &y, hidden)
                        .into_iter()
                        .map(gelu)
                        .collect();
                    let h2 = linear(k("mlp.fc2.weight"), k("mlp.fc2.bias"), &h1, d);
                    for j in 0..d {
                        v[j] += h2[j];
                    }
                }
                blk += 1;
            }
            let cls = ln(&tok[0], g("norm.weight"), g("norm.bias"));
            let c = t["head.bias"].1.len();
            out.extend(linear(g("head.weight"), g("head.bias"), &cls, c));
        }
        out
    }

    #[test]
    fn logits_match_a_direct_transcription_of_timms_forward_pass() {
        let device = Device::flex();
        let cfg = VitConfig {
            image_size: 8,
            patch_size: 4,
            dim: 16,
            depth: 2,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 3,
        };
        // A timm-layout file: an exported backbone with non-trivial norms and a linear head.
        let vit = Vit::new(&cfg, 9, &device);
        let mut t: Named = crate::models::timm::to_timm(&vit, &cfg)
            .into_iter()
            .filter(|(k, _)| !k.starts_with("head."))
            .collect();
        for (k, (_, v)) in t.iter_mut() {
            if k.contains("norm") {
                for (i, a) in v.iter_mut().enumerate() {
                    *a += 0.1 * ((i as f32) * 0.7).sin();
                }
            }
            // Sharper attention, so that the head split and the scale matter.
            if k.ends_with("attn.qkv.weight") {
                v.iter_mut().for_each(|a| *a *= 8.0);
            }
        }
        let wave = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin() * 0.3).collect();
        t.insert("head.weight".into(), (vec![5, 16], wave(80, 0.37)));
        t.insert("head.bias".into(), (vec![5], wave(5, 1.1)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timm_vit.safetensors");
        crate::models::write_named(t.clone(), None, &path).unwrap();
        let x: Vec<f32> = (0..2 * 3 * 64).map(|i| (i as f32 * 0.13).cos()).collect();

        let out = run(&path, None, Some(2), (&[2, 3, 8, 8], &x), &device).unwrap();
        assert!(out.logits);
        assert_eq!(out.shape, vec![2, 5]);
        let want = timm_reference(&t, &x, 2, 8, 2);
        for (a, b) in out.values.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
        }
        // The wrong number of heads gives different logits: the check can fail.
        let other = run(&path, None, Some(4), (&[2, 3, 8, 8], &x), &device).unwrap();
        assert!(
            other
                .values
                .iter()
                .zip(&want)
                .any(|(a, b)| (*a as f64 - b).abs() > 1e-3)
        );

        // Without a head: the class token after the final norm.
        let no_head: BTreeMap<_, _> = t
            .iter()
            .filter(|(k, _)| !k.starts_with("head."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let path2 = dir.path().join("backbone.safetensors");
        crate::models::write_named(no_head, None, &path2).unwrap();
        let pre = run(&path2, None, Some(2), (&[2, 3, 8, 8], &x), &device).unwrap();
        assert!(!pre.logits && pre.shape == vec![2, 16]);

        // A wrong input size names the expected shape.
        let e = run(&path, None, Some(2), (&[1, 3, 4, 4], &x[..48]), &device)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("[B, 3, 8, 8]"), "{e}");

        // The .npy writer round-trips through the reader.
        let npy = dir.path().join("y.npy");
        write_npy(&npy, &out.shape, &out.values).unwrap();
        let (shape, values) = crate::attacks::read_npy(&npy).unwrap();
        assert_eq!((shape, values), (out.shape.clone(), out.values.clone()));
    }
}
