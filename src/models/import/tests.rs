use super::*;
use crate::models::{Vit, timm};

fn cfg(image_size: usize) -> VitConfig {
    VitConfig {
        image_size,
        patch_size: 4,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 3,
    }
}

fn scale(image_size: usize) -> crate::spec::Scale {
    let mut s = crate::spec::load_scale(crate::spec::DEFAULT_SCALES, "scales", "smoke").unwrap();
    s.image_size = image_size;
    s
}

/// timm names for `vit`'s backbone plus a timm classifier head (ignored on import).
fn timm_tensors(vit: &Vit, cfg: &VitConfig) -> Named {
    let mut t = timm::to_timm(vit, cfg);
    t.retain(|k, _| !k.starts_with("head."));
    t.insert("head.weight".into(), (vec![5, 8], vec![0.1; 40]));
    t.insert("head.bias".into(), (vec![5], vec![0.0; 5]));
    t
}

fn logits(vit: &Vit, size: usize, device: &Device) -> Vec<f32> {
    let x = Tensor::<4>::from_data(
        TensorData::new(
            (0..2 * 3 * size * size)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<_>>(),
            [2, 3, size, size],
        ),
        device,
    );
    vit.forward(x).to_data().try_to_vec().unwrap()
}

/// Imports `path` into a store-like dir and returns the model with a new head.
fn import(
    path: &Path,
    heads: Option<usize>,
    key: Option<&str>,
    size: usize,
) -> Result<(Vit, ImportParams)> {
    let device = Device::flex();
    let digest = crate::store::digest_file(path)?.blake3;
    let p = plan_params(path, digest, key, heads, &scale(size), 0)?;
    let out = tempfile::tempdir()?;
    run_import_step(&p, path, out.path(), &device)?;
    let (vit, c) = crate::models::load_vit(out.path(), &device)?;
    assert_eq!(c, p.vit_config());
    Ok((vit.with_new_head(3, 99, &device), p))
}

#[test]
fn timm_safetensors_import_gives_our_logits() {
    let device = Device::flex();
    let c = cfg(8);
    let vit = Vit::new(&c, 7, &device);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vit.safetensors");
    crate::models::write_named(timm_tensors(&vit, &c), None, &path).unwrap();
    let (back, p) = import(&path, Some(2), None, 8).unwrap();
    assert_eq!(
        p.model,
        ModelDims {
            patch_size: 4,
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_ratio: 2
        }
    );
    assert_eq!(p.format, CheckpointFormat::Safetensors);
    let want = vit.with_new_head(3, 99, &device);
    assert_eq!(logits(&back, 8, &device), logits(&want, 8, &device));
    // Heads cannot be read from shapes: an 8-wide model that is not the scale's width
    // needs `heads:`.
    let e = import(&path, None, None, 8).err().unwrap().to_string();
    assert!(e.contains("heads") && e.contains("8-wide"), "{e}");
}

#[test]
fn sit_pth_import_strips_prefixes_and_ignores_other_heads() {
    let device = Device::flex();
    let c = cfg(8);
    let vit = Vit::new(&c, 8, &device);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = timm_tensors(&vit, &c)
        .into_iter()
        .map(|(k, (s, v))| (format!("module.backbone.{k}"), s, v))
        .collect();
    tensors.push(("module.rec_head.weight".into(), vec![2, 2], vec![1.0; 4]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sit.pth");
    std::fs::write(
        &path,
        crate::models::pth::tests::write_pth("teacher", &tensors),
    )
    .unwrap();
    let (back, p) = import(&path, Some(2), None, 8).unwrap();
    assert_eq!(p.checkpoint_key.as_deref(), Some("teacher"));
    let want = vit.with_new_head(3, 99, &device);
    assert_eq!(logits(&back, 8, &device), logits(&want, 8, &device));
    let e = import(&path, Some(2), Some("ema"), 8)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("checkpoint_key 'ema'") && e.contains("teacher"),
        "{e}"
    );
}

#[test]
fn missing_keys_and_bad_shapes_are_listed() {
    let device = Device::flex();
    let c = cfg(8);
    let mut t = timm_tensors(&Vit::new(&c, 1, &device), &c);
    t.remove("blocks.1.mlp.fc2.bias");
    t.remove("norm.weight");
    t.insert("blocks.0.attn.proj.bias".into(), (vec![9], vec![0.0; 9]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    crate::models::write_named(t, None, &path).unwrap();
    let e = import(&path, Some(2), None, 8).err().unwrap().to_string();
    assert!(
        e.contains("missing keys: norm.weight, blocks.1.mlp.fc2.bias")
            && e.contains("blocks.0.attn.proj.bias: [9], expected [8]"),
        "{e}"
    );
    let mut t = timm_tensors(&Vit::new(&c, 1, &device), &c);
    t.insert("blocks.0.ls1.gamma".into(), (vec![8], vec![1e-4; 8]));
    let path = dir.path().join("ls.safetensors");
    crate::models::write_named(t, None, &path).unwrap();
    let e = import(&path, Some(2), None, 8).err().unwrap().to_string();
    assert!(
        e.contains("unsupported ViT variant") && e.contains("blocks.0.ls1.gamma"),
        "{e}"
    );
    let path = dir.path().join("empty.safetensors");
    crate::models::write_named(Named::new(), None, &path).unwrap();
    let e = import(&path, Some(2), None, 8).err().unwrap().to_string();
    assert!(
        e.contains("patch_embed.proj.weight") && e.contains("none"),
        "{e}"
    );
}

#[test]
fn position_embeddings_are_resampled_to_the_scale() {
    // Constant grids stay constant; the same size is the identity.
    let v: Vec<f32> = (0..4 * 3).map(|i| (i % 3) as f32).collect();
    let r = resample_grid(&v, 2, 4, 3);
    assert!(r.chunks(3).all(|c| c == [0.0, 1.0, 2.0]));
    let v: Vec<f32> = (0..9).map(|i| i as f32).collect();
    assert_eq!(resample_grid(&v, 3, 3, 1), v);
    // 2×2 → 4×4 along x: 0, 1 → 0, 0.25, 0.75, 1 (align_corners = false).
    let r = resample_grid(&[0.0, 1.0, 0.0, 1.0], 2, 4, 1);
    assert_eq!(&r[..4], &[0.0, 0.25, 0.75, 1.0]);

    let device = Device::flex();
    let c = cfg(8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vit.safetensors");
    crate::models::write_named(timm_tensors(&Vit::new(&c, 3, &device), &c), None, &path).unwrap();
    let (back, p) = import(&path, Some(2), None, 16).unwrap();
    assert_eq!((p.checkpoint_image_size, p.image_size), (8, 16));
    assert_eq!(back.pos_embed.val().dims(), [1, 17, 8]);
    assert_eq!(logits(&back, 16, &device).len(), 6);
}
