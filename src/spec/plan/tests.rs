use super::*;
use crate::dag::exec::Executor;
use crate::models::{Vit, VitConfig};

const SPEC: &str = "name: t\ntitle: T\ndefaults: { pretrained: ckpt.safetensors }\n\
    grid: { dataset: [synthetic], attack: [badnets-white], defence: [none, ieu] }\n\
    report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n";

fn write_checkpoint(path: &Path, seed: u64) {
    // The smoke scale's width and heads, fewer blocks and a smaller image (8² → 32²).
    let cfg = VitConfig {
        image_size: 8,
        patch_size: 4,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 1000,
    };
    let vit = Vit::new(&cfg, seed, &burn::prelude::Device::flex());
    crate::models::timm::export(&vit, &cfg, path).unwrap();
}

/// The embedded default spec.
fn default_spec() -> LoadedSpec {
    LoadedSpec::from_str(
        crate::spec::DEFAULT_SPEC,
        "default.yaml",
        tempfile::tempdir().unwrap().path().to_path_buf(),
    )
    .unwrap()
}

/// The default spec's steps at the smoke scale (structural keys: parameters and DAG
/// shape, not code), pinned so a refactor cannot silently change what is computed.
#[test]
fn the_default_spec_keeps_its_step_keys() {
    let spec = default_spec();
    let scale = spec.scale("smoke").unwrap();
    let p = plan(&spec, &scale, None).unwrap();
    let structural = p.structural_keys();
    let keys: Vec<(String, String)> = p
        .steps
        .iter()
        .map(|s| (s.label.clone(), structural[&s.key][..12].to_string()))
        .collect();
    let want = [
        ("dataset synthetic", "3450a3b66cc4"),
        ("pretrain synthetic", "8b589234d0b0"),
        ("poison synthetic/badnets-white", "06aee583b028"),
        ("finetune synthetic/badnets-white/none", "98ed16e99fd4"),
        ("evaluate synthetic/badnets-white/none", "698247f7629f"),
        (
            "stage1 f_p synthetic/badnets-white lga(1.0)",
            "860cb95a2ef0",
        ),
        ("finetune synthetic/badnets-white/ieu", "eb2952b61193"),
        ("evaluate synthetic/badnets-white/ieu", "7565d84486cc"),
        ("poison synthetic/blended", "9d7736415587"),
        ("finetune synthetic/blended/none", "26650c91873f"),
        ("evaluate synthetic/blended/none", "0b4c53a4a623"),
        ("stage1 f_p synthetic/blended lga(1.0)", "71ed7c0a50b1"),
        ("finetune synthetic/blended/ieu", "57c7d852a6ca"),
        ("evaluate synthetic/blended/ieu", "4f4d3825435f"),
    ];
    for (label, key) in want {
        assert!(
            keys.contains(&(label.to_string(), key.to_string())),
            "{label} {key} not in {keys:?}"
        );
    }
    assert_eq!(keys.len(), want.len());
}

#[test]
fn attack_variants_carry_their_own_attack_settings() {
    let text = r#"
name: t
title: T
defaults: { attacks: { l2-inv: { l2_norm: 2.5 } } }
attack_variants:
  l2-iid: { base: l2-inv, attacks: { l2-inv: { recipe: iid } } }
  l2-same: { base: l2-inv, attacks: { l2-inv: { l2_norm: 2.5 } } }
grid: { dataset: [synthetic], attack: [l2-inv, l2-iid, l2-same], defence: [none] }
report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }
"#;
    let dir = tempfile::tempdir().unwrap();
    let spec = LoadedSpec::from_str(text, "t.yaml", dir.path().to_path_buf()).unwrap();
    let a = spec.spec.attack_settings("l2-iid", "l2-inv").unwrap();
    assert_eq!(a["recipe"], "iid");
    assert_eq!(a["l2_norm"], 2.5, "other fields keep the defaults");
    let scale = spec.scale("smoke").unwrap();
    let p = plan(&spec, &scale, None).unwrap();
    let key = |label: &str| {
        p.steps
            .iter()
            .find(|s| s.label == label)
            .map(|s| s.key.clone())
            .unwrap()
    };
    assert_ne!(
        key("poison synthetic/l2-inv"),
        key("poison synthetic/l2-iid")
    );
    // A variant that repeats the defaults is the same computation: its steps are the
    // default entry's (same keys), planned once.
    assert!(p.steps.iter().all(|s| !s.label.contains("l2-same")));
    assert_eq!(
        p.steps
            .iter()
            .filter(|s| s.label.starts_with("poison"))
            .count(),
        2
    );
    for (bad, want) in [
        (
            "{ l2-inv: { recipe: blue } }",
            "attack_variants.l2-iid.attacks",
        ),
        (
            "{ l2-inf: { recipe: iid } }",
            "unknown attack section 'l2-inf'",
        ),
        (
            "{ l2-inv: { l2_norm: -1.0 } }",
            "attack_variants.l2-iid.attacks.l2-inv.l2_norm",
        ),
    ] {
        let t = text.replace("{ l2-inv: { recipe: iid } }", bad);
        let e = LoadedSpec::from_str(&t, "t.yaml", dir.path().to_path_buf())
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.yaml") && e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn other_architectures_get_their_own_pretrain_and_f_p_stays_the_vit() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table8.yaml"),
    )
    .unwrap()
    .replace("dataset: [cifar10]", "dataset: [synthetic]");
    let spec = LoadedSpec::from_str(
        &text,
        "table8.yaml",
        tempfile::tempdir().unwrap().path().to_path_buf(),
    )
    .unwrap();
    let scale = spec.scale("smoke").unwrap();
    let p = plan(&spec, &scale, None).unwrap();
    let by_label = |l: &str| {
        p.steps
            .iter()
            .find(|s| s.label == l)
            .unwrap_or_else(|| panic!("no step {l}"))
    };
    let vit_pre = by_label("pretrain synthetic").key.clone();
    let res_pre = by_label("pretrain synthetic resnet18");
    assert_eq!(res_pre.params["arch"], "resnet18");
    assert!(by_label("pretrain synthetic").params.get("arch").is_none());
    let pretrains = p.steps.iter().filter(|s| s.kind == Kind::Pretrain).count();
    assert_eq!(pretrains, 7);
    let ieu = by_label("finetune synthetic/batt/ieu-resnet18");
    assert_eq!(ieu.inputs["pretrain"], res_pre.key);
    let fp = &ieu.inputs["stage1"];
    let stage1 = p.steps.iter().find(|s| &s.key == fp).unwrap();
    assert_eq!(stage1.inputs["pretrain"], vit_pre);
    // Every IEU variant shares the ViT f_p of its attack.
    assert_eq!(
        by_label("finetune synthetic/batt/ieu").inputs["stage1"],
        *fp
    );
    let none = by_label("finetune synthetic/batt/none-vgg11");
    assert_ne!(none.inputs["pretrain"], vit_pre);
    assert_eq!(p.cells.len(), 5 * 14);
}

#[test]
fn architecture_names_and_their_defences_are_checked() {
    let base = "name: t\ntitle: T\ngrid: { dataset: [synthetic], attack: [badnets-white], defence: [DEF] }\n\
        report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n";
    let load = |extra: &str, def: &str| {
        LoadedSpec::from_str(
            &format!("{extra}{}", base.replace("DEF", def)),
            "t.yaml",
            std::env::temp_dir(),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let e = load(
        "variants: { ieu-x: { base: ieu, model: wrn50 } }\n",
        "ieu-x",
    );
    assert!(
        e.contains("t.yaml") && e.contains("variants.ieu-x.model") && e.contains("resnet18"),
        "{e}"
    );
    let e = load(
        "variants: { abl-x: { base: abl, model: vgg11 } }\n",
        "abl-x",
    );
    assert!(e.contains("variants.abl-x.model"), "{e}");
    let e = load("defaults: { model: resnet }\n", "none");
    assert!(e.contains("defaults.model"), "{e}");
    let e = load("defaults: { model: resnet18 }\n", "abl");
    assert!(e.contains("defaults.model") && e.contains("abl"), "{e}");
    let e = load("variants: { none-x: { base: none } }\n", "none-x");
    assert!(e.contains("variants.none-x.base"), "{e}");
}

#[test]
fn pretrained_checkpoint_replaces_pretrain_with_an_import_step() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt.safetensors");
    write_checkpoint(&ckpt, 1);
    let spec = LoadedSpec::from_str(SPEC, "t.yaml", dir.path().to_path_buf()).unwrap();
    let scale = spec.scale("smoke").unwrap();
    let p = plan(&spec, &scale, None).unwrap();
    let kinds: Vec<Kind> = p.steps.iter().map(|s| s.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == Kind::Import).count(), 1);
    assert!(!kinds.contains(&Kind::Pretrain), "{kinds:?}");
    let import = p.steps.iter().find(|s| s.kind == Kind::Import).unwrap();
    assert_eq!(import.label, "import ckpt.safetensors");
    let ip: ImportParams = import.params().unwrap();
    assert_eq!((ip.model.depth, ip.model.heads, ip.image_size), (2, 2, 32));

    // Downstream steps (stage-1 truncation, finetuning with a new head) run unchanged.
    let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
    let summary = Executor::new(store.clone(), None, 1).run(&p).unwrap();
    assert_eq!(summary.ran, p.steps.len());
    // Nothing is pretrained here: every training image is in D_tune.
    let ds = p.steps.iter().find(|s| s.kind == Kind::Dataset).unwrap();
    let meta = crate::data::load_meta(&store.object_dir(&ds.key)).unwrap();
    assert_eq!(
        (meta.pretrain, meta.tune),
        (0, scale.data.pretrain + scale.data.tune)
    );
    assert!(
        store
            .object_dir(&import.key)
            .join("model.safetensors")
            .is_file()
    );

    // A different file is a different key; a missing file names the field.
    write_checkpoint(&ckpt, 2);
    let again = plan(&spec, &scale, None).unwrap();
    assert!(!again.steps.iter().any(|s| s.key == import.key));
    std::fs::remove_file(&ckpt).unwrap();
    let e = plan(&spec, &scale, None).unwrap_err().to_string();
    assert!(
        e.contains("defaults.pretrained") && e.contains("does not exist"),
        "{e}"
    );
    // f_p deeper than the imported checkpoint is caught when planning.
    write_checkpoint(&ckpt, 1);
    let deep = SPEC.replace(
        "pretrained: ckpt.safetensors",
        "pretrained: ckpt.safetensors, ieu: { fp_depth: 3 }",
    );
    let spec = LoadedSpec::from_str(&deep, "t.yaml", dir.path().to_path_buf()).unwrap();
    let e = plan(&spec, &scale, None).unwrap_err().to_string();
    assert!(e.contains("f_p depth 3 exceeds the 2-block"), "{e}");
}

#[test]
fn trigger_files_enter_the_poison_step_as_digests_and_locators() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("key.png");
    image::RgbImage::from_pixel(4, 4, image::Rgb([9, 8, 7]))
        .save(&png)
        .unwrap();
    let text = "name: t\ntitle: T\ndefaults: { attacks: { blended: { trigger_file: key.png } } }\n\
        grid: { dataset: [synthetic], attack: [blended, cat+blended], defence: [none] }\n\
        report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n";
    let spec = LoadedSpec::from_str(text, "t.yaml", dir.path().to_path_buf()).unwrap();
    let scale = spec.scale("smoke").unwrap();
    let p = plan(&spec, &scale, None).unwrap();
    let step = p
        .steps
        .iter()
        .find(|s| s.label == "poison synthetic/blended")
        .unwrap();
    let digest = crate::store::stat_cache::digest(&png).unwrap();
    assert_eq!(step.params["attack"]["trigger_digest"], digest.as_str());
    assert_eq!(step.params["attack"]["alpha"], 0.4);
    assert_eq!(step.locators["trigger_file"], png);
    // CAT's base is the same step; the CAT step reads it and an f_p tuned on it.
    let cat = p
        .steps
        .iter()
        .find(|s| s.label == "poison synthetic/cat+blended")
        .unwrap();
    assert_eq!(cat.params["attack"]["base"], "blended");
    assert_eq!(cat.inputs["base"], step.key);
    assert!(cat.locators.is_empty());
    std::fs::remove_file(&png).unwrap();
    let e = plan(&spec, &scale, None).unwrap_err().to_string();
    assert!(
        e.contains("t.yaml") && e.contains("defaults.attacks.blended.trigger_file"),
        "{e}"
    );
}

/// `--seed 0,2`: the spec planned once per seed; seed 0's cells are the spec's own (its
/// keys do not move), seed 2's are all new steps.
#[test]
fn several_seeds_plan_the_spec_once_per_seed() {
    let spec = default_spec();
    let scale = spec.scale("smoke").unwrap();
    let own = plan(&spec, &scale, None).unwrap();
    let unseeded = plan_seeds(&spec, &scale, None, &[], false).unwrap();
    let keys = |p: &Plan| p.steps.iter().map(|s| s.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&unseeded), keys(&own));
    assert_eq!(own.seeds(), vec![0]);

    let both = plan_seeds(&spec, &scale, None, &[0, 2], false).unwrap();
    assert_eq!(both.seeds(), vec![0, 2]);
    assert_eq!(both.cells.len(), 2 * own.cells.len());
    assert_eq!(
        both.steps.len(),
        2 * own.steps.len(),
        "a step shared by seeds"
    );
    for (a, b) in own.cells.iter().zip(&both.cells) {
        assert_eq!((a.seed, &a.evaluate), (b.seed, &b.evaluate));
    }
    let own_keys = keys(&own);
    for c in both.cells.iter().filter(|c| c.seed == 2) {
        assert!(
            !own_keys.contains(&c.evaluate),
            "seed 2 reuses {}",
            c.evaluate
        );
    }
    let e = plan_seeds(&spec, &scale, None, &[1, 2, 1], false).unwrap_err();
    assert!(format!("{e:#}").contains("seed 1 is given twice"), "{e:#}");
}
