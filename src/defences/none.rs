//! No defence: vanilla finetuning of f_r on the poisoned finetuning set. Its model is also
//! what post-training defences (I-BAU, Fine-Pruning) and test-time defences (AttnBlock)
//! start from.

use std::path::Path;

use anyhow::Result;
use burn::prelude::*;
use serde_json::Value;

use super::{Defence, DefenceParams, FinetuneInputs, FinetuneParams};
use crate::data::ImageSet;
use crate::spec::plan::CellPlan;
use crate::train::{LossKind, train_supervised};

pub struct NoDefence;

impl Defence for NoDefence {
    fn name(&self) -> &'static str {
        "none"
    }
    fn any_architecture(&self) -> bool {
        true
    }
    fn plan(&self, cell: &mut CellPlan, _settings: &Value) -> Result<String> {
        if cell.fr_is_vit() {
            cell.undefended()
        } else {
            cell.finetune(DefenceParams::none(), &[])
        }
    }
    fn run(
        &self,
        p: &FinetuneParams,
        inputs: &FinetuneInputs,
        out: &Path,
        device: &Device,
    ) -> Result<()> {
        run(p, inputs, out, device)
    }
}

pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let meta = crate::data::load_meta(&inputs.dataset)?;
    let tune = ImageSet::load(&inputs.poison.join("tune.safetensors"))?;
    let (model, cfg) =
        super::initial_robust_net(&inputs.pretrain, meta.num_classes(), p.seed, device)?;
    let ad = device.clone().autodiff();
    let sup = p.supervised("finetune", tune.len());
    let (model, log) = train_supervised(model, &tune, &meta, &sup, LossKind::Ce, &ad)?;
    let stats = serde_json::json!({ "loss_per_epoch": log });
    crate::models::save_net_with_stats(&model.valid(), &cfg, &stats, out)
}
