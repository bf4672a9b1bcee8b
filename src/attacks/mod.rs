//! Backdoor attacks, their registry, and the `poison` step.
//!
//! Input: the clean dataset step. Output: `tune.safetensors` (the finetuning set with a
//! fraction α of its non-target images triggered and relabelled to the target, or, for the
//! clean-label SIG, every target-class image triggered with its label kept),
//! `poison_indices.json` (which tune images carry the trigger), and `test.safetensors`
//! (every test image whose true label is not the target, triggered and labelled with the
//! target: the ASR set).
//!
//! Every attack generates its trigger from the seed at any image size; where a published
//! trigger file exists a spec can name it (`trigger_file:`), and its content digest enters
//! the step key. One file per attack documents its recipe.
//!
//! **Adding an attack** is one file and one line: a module here (declared below) that
//! implements [`Attack`] (its settings with their defaults and checks, its step
//! parameters, its trigger, what it plans, and the `run` of its `poison` step) and its
//! entry in [`REGISTRY`]. The module's `pub fn run` computes its poison step: the planner, the
//! executor, the preview and the spec parser (`defaults.attacks.<name>`, variants based on
//! it) go through the registry, and `build.rs` roots one code identity per module at its
//! `run` (`poison/<module>`), so an edit to one attack re-runs only its own poison steps.

pub mod badnets;
pub mod batt;
pub mod blended;
pub mod cat;
pub mod invisible_l0;
pub mod invisible_l2;
pub mod issba;
pub mod sig;
pub mod smooth;
pub mod trojan;
pub mod wanet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::ImageSet;
use crate::report::preview::{Preview, PreviewCache};
use crate::spec::plan::{PoisonPlan, SpecFiles};

/// Every attack a spec can name, in the order `--help`, errors and the preview list them.
pub static REGISTRY: &[&dyn Attack] = &[
    &badnets::WHITE,
    &badnets::PATTERN,
    &blended::Blended,
    &trojan::SQUARE,
    &trojan::WATERMARK,
    &invisible_l0::L0Inv,
    &invisible_l2::L2Inv,
    &smooth::Smooth,
    &sig::Sig,
    &issba::Issba,
    &batt::Batt,
    &wanet::Wanet,
    &cat::Cat,
];

/// The registered attack of a name.
pub fn registered(name: &str) -> Option<&'static dyn Attack> {
    REGISTRY.iter().copied().find(|a| a.name() == name)
}

/// The names of every registered attack.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|a| a.name()).collect()
}

/// The attack a grid entry names, and the base attack it names with it: `<attack>+<base>`
/// for an attack that [takes a base](Attack::takes_base) (`cat+blended`), whose base is a
/// registered attack that takes none.
pub fn resolve(name: &str) -> Option<(&'static dyn Attack, Option<&str>)> {
    if let Some(a) = registered(name) {
        return Some((a, None));
    }
    let (head, base) = name.split_once('+')?;
    let a = registered(head).filter(|a| a.takes_base())?;
    registered(base).filter(|b| !b.takes_base())?;
    Some((a, Some(base)))
}

/// An attack: what the spec may set, what it plans, its trigger, and how its `poison` step
/// runs.
pub trait Attack: Sync {
    /// Its name in specs (`grid.attack`, `defaults.attacks.<name>`, a variant's `base`)
    /// and in the `poison` step's parameters.
    fn name(&self) -> &'static str;

    /// The module that implements it (`badnets` for both BadNets attacks): its poison
    /// steps are keyed by that module's code identity, `poison/<module>`.
    fn module(&self) -> &'static str {
        let path = std::any::type_name::<Self>();
        let after = path.split_once("::attacks::").map_or(path, |(_, a)| a);
        after.split("::").next().unwrap_or(after)
    }

    /// Its settings with every default (`defaults.attacks.<name>` and a variant's
    /// `attacks: { <name>: … }` are merged over them).
    fn default_settings(&self) -> Value;

    /// Checks merged settings; the message names the field (`alpha: 2 is not in (0, 1]`).
    fn check(&self, settings: &Value) -> Result<(), String>;

    /// Clean-label attacks poison every target-class image and keep every label (SIG).
    fn clean_label(&self) -> bool {
        false
    }

    /// Whether a grid entry may name it on another attack, `<name>+<base>` (CAT).
    fn takes_base(&self) -> bool {
        false
    }

    /// Its step parameters from merged settings; the trigger files the settings name enter
    /// as content digests, and `files` records them as the step's locators.
    fn params(&self, settings: &Value, files: &mut SpecFiles) -> Result<AttackParams>;

    /// Adds its poison step (and the steps that step reads) to the plan; returns the poison
    /// step's key. By default one poison step on the dataset.
    fn plan(&self, cx: &mut PoisonPlan, settings: &Value) -> Result<String> {
        let params = self.params(settings, &mut cx.files)?;
        cx.poison(params, &[])
    }

    /// Its trigger at an image size, for attacks with one fixed trigger.
    fn trigger(&self, p: &PoisonParams, _size: usize, _files: &TriggerFiles) -> Result<Trigger> {
        bail!(
            "{}: sample-specific, no fixed trigger (its poison step reads its input steps)",
            p.attack.name()
        )
    }

    /// Poisons clean sets in memory, as its `poison` step does (tests, the preview).
    fn poison(
        &self,
        p: &PoisonParams,
        tune: &ImageSet,
        test: &ImageSet,
        files: &TriggerFiles,
    ) -> Result<Poisoned> {
        let trigger = self.trigger(p, tune.size, files)?;
        Ok(poison(p, tune, test, &trigger, self.clean_label()))
    }

    /// Computes its `poison` step: routes to its module's `pub fn run`, the root of the
    /// step's code identity (keep arithmetic out of this method); returns the number of
    /// poisoned training images.
    fn run(
        &self,
        p: &PoisonParams,
        inputs: &PoisonInputs,
        out: &Path,
        device: &Device,
    ) -> Result<usize>;

    /// Its row of the preview figure: the poisoned version of one clean image, with the
    /// default settings. By default its trigger applied.
    fn preview(&self, cx: &Preview, _cache: &mut PreviewCache, clean: &[u8]) -> Result<Vec<u8>> {
        let p = cx.params(default_params(self)?);
        let size = cx.pool.size;
        let trigger = self.trigger(&p, size, &TriggerFiles::default())?;
        let mut x = clean.to_vec();
        trigger.apply(&mut x, size);
        Ok(x)
    }
}

/// An attack's parameters with its default settings (generated triggers, no files).
pub fn default_params(attack: &(impl Attack + ?Sized)) -> Result<AttackParams> {
    attack.params(&attack.default_settings(), &mut SpecFiles::none())
}

/// The default settings of a typed settings struct, as [`Attack::default_settings`]
/// returns them.
pub fn defaults<S: crate::defences::Settings>() -> Value {
    S::defaults().unwrap_or_default()
}

/// An attack with every parameter that affects its output: its name and its own fields in
/// one JSON object (`{"name": "blended", "alpha": 0.4, "trigger_digest": null}`). File-based
/// triggers enter as their content digests; the files themselves are found through the
/// step's locators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttackParams(serde_json::Map<String, Value>);

impl AttackParams {
    /// An attack's parameters: its name and the fields of `params`.
    pub fn new<P: Serialize>(name: &str, params: &P) -> Result<Self> {
        match serde_json::to_value(params)? {
            Value::Object(mut fields) => {
                fields.insert("name".into(), Value::String(name.to_string()));
                Ok(Self(fields))
            }
            other => bail!("parameters of attack {name} are not a mapping: {other}"),
        }
    }

    pub fn name(&self) -> &str {
        self.0.get("name").and_then(Value::as_str).unwrap_or("?")
    }

    /// The attack's own fields, typed.
    pub fn fields<P: DeserializeOwned>(&self) -> Result<P> {
        let mut fields = self.0.clone();
        fields.remove("name");
        serde_json::from_value(Value::Object(fields))
            .map_err(|e| anyhow!("parameters of attack {}: {e}", self.name()))
    }
}

/// Parameters of a `poison` step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoisonParams {
    pub attack: AttackParams,
    pub poison_rate: f64,
    pub target: usize,
    pub seed: u64,
}

/// A ready-to-apply trigger at one image size (CHW u8 images).
#[derive(Debug, Clone)]
pub enum Trigger {
    /// x' = ⌊(1 − w)·x + w·p⌋ per pixel (BackdoorBox's AddTrigger, truncating cast);
    /// `weight` is H·W, `pattern` CHW u8.
    Blend { weight: Vec<f32>, pattern: Vec<u8> },
    /// x' = clip(x·keep + t, 0, 255) (TrojanNN-style additive triggers); `keep` CHW (1 keeps
    /// the pixel, 0 replaces it), `pattern` CHW in pixel units.
    Additive {
        keep: Option<Vec<f32>>,
        pattern: Vec<f32>,
    },
    /// Rotation by `degrees` counter-clockwise, nearest neighbour, black corners (BATT).
    Rotate { degrees: f64 },
    /// Bilinear resampling at a warped grid (WaNet): `grid` holds H·W (x, y) in [−1, 1].
    Warp { grid: Vec<[f32; 2]> },
}

impl Trigger {
    pub fn apply(&self, img: &mut [u8], size: usize) {
        let hw = size * size;
        match self {
            Trigger::Blend { weight, pattern } => {
                for c in 0..3 {
                    for p in 0..hw {
                        let i = c * hw + p;
                        let w = weight[p];
                        img[i] = ((1.0 - w) * img[i] as f32 + w * pattern[i] as f32) as u8;
                    }
                }
            }
            Trigger::Additive { keep, pattern } => {
                for i in 0..img.len() {
                    let k = keep.as_ref().map_or(1.0, |k| k[i]);
                    img[i] = (img[i] as f32 * k + pattern[i]).clamp(0.0, 255.0) as u8;
                }
            }
            Trigger::Rotate { degrees } => batt::rotate(img, size, *degrees),
            Trigger::Warp { grid } => wanet::warp(img, size, grid),
        }
    }
}

/// Trigger files of a poison step, found through its locators (`trigger_file`,
/// `mask_file`).
#[derive(Debug, Clone, Default)]
pub struct TriggerFiles {
    pub trigger: Option<PathBuf>,
    pub mask: Option<PathBuf>,
}

impl TriggerFiles {
    /// The trigger file, if the parameters name one (by its digest).
    pub fn trigger_if(&self, digest: &Option<String>) -> Result<Option<&Path>> {
        file_if(digest, &self.trigger, "trigger")
    }

    /// The mask file, if the parameters name one (by its digest).
    pub fn mask_if(&self, digest: &Option<String>) -> Result<Option<&Path>> {
        file_if(digest, &self.mask, "mask")
    }
}

fn file_if<'a>(
    digest: &Option<String>,
    path: &'a Option<PathBuf>,
    what: &str,
) -> Result<Option<&'a Path>> {
    match (digest, path) {
        (None, _) => Ok(None),
        (Some(_), Some(p)) => Ok(Some(p)),
        (Some(_), None) => bail!("the {what} file of this step is not available"),
    }
}

/// Inputs of a poison step: the dataset step's directory, the directories of the attack's
/// own input steps by role, and its trigger files.
pub struct PoisonInputs {
    pub dataset: PathBuf,
    pub others: BTreeMap<String, PathBuf>,
    pub files: TriggerFiles,
}

impl PoisonInputs {
    /// An input the attack planned (`stegastamp`, `base`, `stage1`).
    pub fn input(&self, role: &str) -> Result<&Path> {
        self.others.get(role).map(PathBuf::as_path).ok_or_else(|| {
            anyhow!(
                "this poison step has no `{role}` input (it has: dataset{})",
                self.others
                    .keys()
                    .map(|k| format!(", {k}"))
                    .collect::<String>()
            )
        })
    }
}

/// The trigger of a poison step's attack at an image size (through the registry).
pub fn build(p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
    let name = p.attack.name();
    let a = registered(name).ok_or_else(|| anyhow!("unknown attack '{name}'"))?;
    a.trigger(p, size, files)
}

/// Chooses round(α · #non-target) non-target images of `set`, seeded; sorted indices.
pub fn choose_poison_indices(set: &ImageSet, rate: f64, target: usize, seed: u64) -> Vec<usize> {
    let mut candidates: Vec<usize> = (0..set.len())
        .filter(|&i| set.labels[i] as usize != target)
        .collect();
    let n = (rate * candidates.len() as f64).round() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9015_0000);
    candidates.shuffle(&mut rng);
    let mut chosen = candidates[..n].to_vec();
    chosen.sort_unstable();
    chosen
}

pub struct Poisoned {
    pub tune: ImageSet,
    /// Tune images that carry the trigger.
    pub indices: Vec<usize>,
    /// WaNet noise mode: images warped with a noisy grid, labels kept.
    pub noise_indices: Vec<usize>,
    pub test: ImageSet,
}

/// Poisons with a fixed trigger: the tune images chosen (round(α · #non-target) non-target
/// images, or for a clean-label attack every target-class image) are triggered and
/// labelled with the target, and every non-target test image is triggered (the ASR set).
pub fn poison(
    p: &PoisonParams,
    tune: &ImageSet,
    test: &ImageSet,
    trigger: &Trigger,
    clean_label: bool,
) -> Poisoned {
    let size = tune.size;
    let target = p.target as u16;
    let indices = if clean_label {
        // SIG (Appendix A.1): every training image of the target class, labels unchanged.
        (0..tune.len())
            .filter(|&i| tune.labels[i] == target)
            .collect()
    } else {
        choose_poison_indices(tune, p.poison_rate, p.target, p.seed)
    };
    let mut ptune = tune.clone();
    for &i in &indices {
        trigger.apply(ptune.image_mut(i), size);
        ptune.labels[i] = target;
    }
    let mut ptest = ImageSet::new(size);
    let mut buf = vec![0u8; test.stride()];
    for i in 0..test.len() {
        if test.labels[i] == target {
            continue;
        }
        buf.copy_from_slice(test.image(i));
        trigger.apply(&mut buf, size);
        ptest.push(&buf, target);
    }
    Poisoned {
        tune: ptune,
        indices,
        noise_indices: Vec::new(),
        test: ptest,
    }
}

/// The clean tune and test sets of a dataset step, after checking the target class.
pub fn load_clean(p: &PoisonParams, dataset_dir: &Path) -> Result<(ImageSet, ImageSet)> {
    let meta = crate::data::load_meta(dataset_dir)?;
    if p.target >= meta.num_classes() {
        bail!(
            "target class {} does not exist: dataset {} has {} classes",
            p.target,
            meta.name,
            meta.num_classes()
        );
    }
    let tune = ImageSet::load(&dataset_dir.join("tune.safetensors"))?;
    let test = ImageSet::load(&dataset_dir.join("test.safetensors"))?;
    Ok((tune, test))
}

/// Writes the outputs of a poison step.
pub fn write_poisoned(res: &Poisoned, out: &Path) -> Result<()> {
    res.tune.save(&out.join("tune.safetensors"))?;
    res.test.save(&out.join("test.safetensors"))?;
    crate::store::write_synced(
        &out.join("poison_indices.json"),
        serde_json::to_string(&res.indices)?.as_bytes(),
    )?;
    if !res.noise_indices.is_empty() {
        crate::store::write_synced(
            &out.join("noise_indices.json"),
            serde_json::to_string(&res.noise_indices)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Runs a `poison` step on the clean sets of its dataset step: `poisoned` makes the
/// poisoned sets, which are written as the step's outputs; returns the number of poisoned
/// training images.
pub fn run_poisoning(
    p: &PoisonParams,
    inputs: &PoisonInputs,
    out: &Path,
    poisoned: impl FnOnce(&ImageSet, &ImageSet) -> Result<Poisoned>,
) -> Result<usize> {
    let (tune, test) = load_clean(p, &inputs.dataset)?;
    let res = poisoned(&tune, &test)?;
    write_poisoned(&res, out)?;
    Ok(res.indices.len())
}

/// The trigger of a fixed-trigger attack at an image size, from the step's parameters and
/// trigger files.
pub type TriggerFn = fn(&PoisonParams, usize, &TriggerFiles) -> Result<Trigger>;

/// Runs the `poison` step of a fixed-trigger attack: [`poison`] with its `trigger` at the
/// dataset's image size.
pub fn run_poison_step(
    p: &PoisonParams,
    inputs: &PoisonInputs,
    out: &Path,
    clean_label: bool,
    trigger: TriggerFn,
) -> Result<usize> {
    run_poisoning(p, inputs, out, |tune, test| {
        let t = trigger(p, tune.size, &inputs.files)?;
        Ok(poison(p, tune, test, &t, clean_label))
    })
}

pub fn load_poison_indices(dir: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(dir.join("poison_indices.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Reads an image file as CHW u8 at `size` (bilinear resize, like cv2.INTER_LINEAR).
pub fn read_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    let img = image::open(path)
        .with_context(|| format!("trigger file {}: cannot read image", path.display()))?
        .to_rgb8();
    let img = image::imageops::resize(
        &img,
        size as u32,
        size as u32,
        image::imageops::FilterType::Triangle,
    );
    Ok(crate::data::rgb_to_chw(&img))
}

/// Reads a float32 `.npy` array: its shape and values.
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = npy
        .into_vec()
        .with_context(|| format!("{}: expected a float32 array", path.display()))?;
    Ok((shape, data))
}

/// Resizes a CHW f32 plane stack to `size` (bilinear).
pub fn resize_f32(chw: &[f32], from: usize, to: usize) -> Vec<f32> {
    if from == to {
        return chw.to_vec();
    }
    let channels = chw.len() / (from * from);
    let mut out = vec![0f32; channels * to * to];
    let scale = from as f32 / to as f32;
    for c in 0..channels {
        for y in 0..to {
            for x in 0..to {
                let sy = ((y as f32 + 0.5) * scale - 0.5).clamp(0.0, (from - 1) as f32);
                let sx = ((x as f32 + 0.5) * scale - 0.5).clamp(0.0, (from - 1) as f32);
                let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(from - 1), (x0 + 1).min(from - 1));
                let (fy, fx) = (sy - y0 as f32, sx - x0 as f32);
                let at = |yy: usize, xx: usize| chw[c * from * from + yy * from + xx];
                out[c * to * to + y * to + x] = (at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx)
                    * (1.0 - fy)
                    + (at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx) * fy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
