//! Models and their checkpoints.
//!
//! Checkpoints are safetensors files with one F32 tensor per parameter, named by its
//! module path (`blocks.0.attn.qkv.weight`, …) and written in sorted order, so the same
//! weights always give the same bytes (and the same digest in the store).

pub mod cait;
pub mod deit;
pub mod fused;
pub mod fused_attention;
pub mod import;
pub mod logits;
pub mod net;
pub mod pit;
pub mod pth;
pub mod resnet;
pub mod timm;
pub mod vgg;
pub mod vit;
pub mod xcit;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use safetensors::tensor::{Dtype, TensorView};

pub use net::{Arch, Classifier, Net, NetConfig, load_net, save_net, save_net_with_stats};
pub use vit::{Vit, VitConfig};

struct Collect {
    path: Vec<String>,
    out: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let data: Vec<f32> = tensor
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 tensor");
        self.out
            .insert(self.path.join("."), (tensor.dims().to_vec(), data));
    }
}

/// Every float parameter of a module by path.
pub fn named_params<M: Module>(m: &M) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut c = Collect {
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    m.visit(&mut c);
    c.out
}

/// Parameters by name: shape and row-major f32 values.
pub type Named = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Writes named f32 tensors as safetensors (sorted by name, so the bytes are reproducible).
pub fn write_named(
    named: Named,
    metadata: Option<std::collections::HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(k, (shape, v))| (k, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, b)| Ok((k.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    crate::store::write_atomic(path, &safetensors::serialize(views, metadata)?)
}

/// The values of an F32 safetensors view.
pub fn f32_values(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn save_safetensors<M: Module>(m: &M, path: &Path) -> Result<()> {
    write_named(named_params(m), None, path)
}

struct Load {
    path: Vec<String>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    device: Device,
    used: usize,
    errors: Vec<String>,
}

impl ModuleMapper for Load {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let dims = param.val().dims();
        match self.tensors.get(&name) {
            Some((shape, data)) if shape.as_slice() == dims.as_slice() => {
                self.used += 1;
                let grad = param.val().is_require_grad();
                let t = Tensor::<D>::from_data(
                    TensorData::new(data.clone(), shape.clone()),
                    &self.device,
                );
                let t = if grad { t.require_grad() } else { t };
                let (id, _, _) = param.consume();
                Param::initialized(id, t)
            }
            Some((shape, _)) => {
                self.errors.push(format!(
                    "{name}: checkpoint shape {shape:?}, model shape {dims:?}"
                ));
                param
            }
            None => {
                self.errors.push(format!("{name}: missing from checkpoint"));
                param
            }
        }
    }
}

/// Loads a checkpoint written by [`save_safetensors`] into `m` (every parameter must match).
pub fn load_safetensors<M: Module>(m: M, path: &Path, device: &Device) -> Result<M> {
    load_named(
        m,
        read_safetensors(path)?,
        device,
        &path.display().to_string(),
    )
}

/// Every tensor of an F32 safetensors file.
pub fn read_safetensors(path: &Path) -> Result<Named> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors checkpoint", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor {name} is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
        }
        let data = f32_values(&view);
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(tensors)
}

/// Sets every float parameter of `m` from `tensors` (by module path); every parameter must
/// be present with its shape and every tensor used. `origin` names the source in errors.
pub fn load_named<M: Module>(m: M, tensors: Named, device: &Device, origin: &str) -> Result<M> {
    let total = tensors.len();
    let mut loader = Load {
        path: Vec::new(),
        tensors,
        device: device.clone(),
        used: 0,
        errors: Vec::new(),
    };
    let m = m.map(&mut loader);
    if !loader.errors.is_empty() {
        bail!(
            "checkpoint {origin} does not fit the model:\n  {}",
            loader.errors.join("\n  ")
        );
    }
    if loader.used != total {
        bail!(
            "checkpoint {origin}: {} tensors are not used by the model",
            total - loader.used
        );
    }
    Ok(m)
}

pub fn save_config(cfg: &VitConfig, path: &Path) -> Result<()> {
    crate::store::write_json(path, cfg)
}

pub fn load_config(path: &Path) -> Result<VitConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Loads a ViT saved as `model.safetensors` + `config.json` in `dir`.
pub fn load_vit(dir: &Path, device: &Device) -> Result<(Vit, VitConfig)> {
    let arch = net::load_net_config(dir)?.arch;
    if !arch.is_vit() {
        bail!(
            "{} holds a {} model; this step needs a ViT (model: vit)",
            dir.display(),
            arch.name()
        );
    }
    let cfg = load_config(&dir.join("config.json"))?;
    let vit = load_safetensors(
        Vit::new(&cfg, 0, device),
        &dir.join("model.safetensors"),
        device,
    )?;
    Ok((vit, cfg))
}

/// Writes a trained model (as [`save_vit`]) and its statistics as `train_stats.json`.
pub fn save_with_stats<S: serde::Serialize>(
    vit: &Vit,
    cfg: &VitConfig,
    stats: &S,
    dir: &Path,
) -> Result<()> {
    save_vit(vit, cfg, dir)?;
    crate::store::write_json(&dir.join("train_stats.json"), stats)
}

pub fn save_vit(vit: &Vit, cfg: &VitConfig, dir: &Path) -> Result<()> {
    save_config(cfg, &dir.join("config.json"))?;
    save_safetensors(vit, &dir.join("model.safetensors"))
}
