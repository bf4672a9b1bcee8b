use std::path::Path;

use super::*;

const GOOD: &str = r#"
name: t
title: T
grid: { dataset: [synthetic], attack: [badnets-white], defence: [none, ieu] }
report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }
"#;

#[test]
fn parses_minimal_spec_with_defaults() {
    let s = LoadedSpec::from_str(GOOD, "t.yaml", ".".into()).unwrap();
    assert_eq!(s.spec.defaults.target, 1);
    assert_eq!(s.spec.ieu_defaults().unwrap().c_thresh, 0.95);
}

#[test]
fn unknown_key_names_file_and_field() {
    let bad = GOOD.replace("name: t", "name: t\ndefaults: { poison_rat: 0.2 }");
    let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml") && e.contains("defaults") && e.contains("poison_rat"),
        "{e}"
    );
}

#[test]
fn unknown_attack_names_index() {
    let bad = GOOD.replace("[badnets-white]", "[badnets-white, badnetz]");
    let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(e.contains("grid.attack[1]") && e.contains("badnetz"), "{e}");
}

#[test]
fn bad_value_is_rejected() {
    let bad = GOOD.replace("name: t", "name: t\ndefaults: { poison_rate: 1.5 }");
    let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("defaults.poison_rate") && e.contains("1.5"),
        "{e}"
    );
}

#[test]
fn only_filters_and_rejects_unknown_values() {
    let mut s = LoadedSpec::from_str(GOOD, "t.yaml", ".".into()).unwrap();
    s.apply_only(&["defence=ieu".into()]).unwrap();
    assert_eq!(s.spec.grid.defence, vec!["ieu"]);
    let e = s
        .apply_only(&["attack=blended".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'blended' is not in grid.attack"), "{e}");
    let e = s
        .apply_only(&["colour=red".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown axis 'colour'"), "{e}");
}

#[test]
fn variants_override_ieu_settings_and_are_checked() {
    let spec = GOOD.replace(
        "name: t",
        "name: t\ndefaults: { ieu: { unlearn_rate: { constant: 2.0 } } }\nvariants:\n  ieu-nm: { base: ieu, ieu: { logit_masking: false, c_thresh: 0.9 } }",
    );
    let spec = spec.replace("defence: [none, ieu]", "defence: [none, ieu, ieu-nm]");
    let s = LoadedSpec::from_str(&spec, "t.yaml", ".".into()).unwrap();
    let v = <crate::defences::ieu::IeuSettings as crate::defences::Settings>::of(
        &s.spec.defence_settings("ieu-nm").unwrap(),
    )
    .unwrap();
    assert!(!v.logit_masking && v.c_thresh == 0.9);
    assert_eq!(
        v.unlearn_rate,
        crate::defences::ieu::UnlearnRate::Constant(2.0),
        "inherits defaults"
    );
    assert_eq!(s.spec.defence_base("ieu-nm"), "ieu");
    let bad = spec.replace("c_thresh: 0.9", "c_tresh: 0.9");
    let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("variants.ieu-nm") && e.contains("c_tresh"),
        "{e}"
    );
    let bad = spec.replace("c_thresh: 0.9", "c_thresh: 1.5");
    let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(e.contains("variants.ieu-nm.ieu.c_thresh"), "{e}");
}

#[test]
fn dataset_entries_are_grid_datasets_and_are_checked() {
    let spec = GOOD.replace(
        "name: t",
        "name: t\ndatasets:\n  signs: { format: imagefolder, path: data/signs }",
    );
    let spec = spec.replace("dataset: [synthetic]", "dataset: [synthetic, signs]");
    let s = LoadedSpec::from_str(&spec, "t.yaml", ".".into()).unwrap();
    assert_eq!(s.spec.datasets["signs"].path, "data/signs");
    let e = LoadedSpec::from_str(&spec.replace("imagefolder", "lmdb"), "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml") && e.contains("datasets.signs.format"),
        "{e}"
    );
    let e = LoadedSpec::from_str(&spec.replace("path:", "root:"), "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(e.contains("datasets.signs") && e.contains("root"), "{e}");
    let e = LoadedSpec::from_str(
        &spec
            .replace("  signs:", "  cifar10:")
            .replace("signs]", "cifar10]"),
        "t.yaml",
        ".".into(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("datasets.cifar10") && e.contains("built-in"),
        "{e}"
    );
    let e = LoadedSpec::from_str(
        &spec.replace("[synthetic, signs]", "[synthetic, sings]"),
        "t.yaml",
        ".".into(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("grid.dataset[1]") && e.contains("sings"), "{e}");
}

#[test]
fn pretrained_is_a_path_or_a_mapping() {
    let with = |v: &str| {
        GOOD.replace(
            "name: t",
            &format!("name: t\ndefaults: {{ pretrained: {v} }}"),
        )
    };
    let s = LoadedSpec::from_str(&with("vit.safetensors"), "t.yaml", ".".into()).unwrap();
    let p = s.spec.defaults.pretrained.unwrap();
    assert_eq!((p.path.as_str(), p.heads), ("vit.safetensors", None));
    let s = LoadedSpec::from_str(
        &with("{ path: sit.pth, heads: 6, checkpoint_key: teacher }"),
        "t.yaml",
        ".".into(),
    )
    .unwrap();
    let p = s.spec.defaults.pretrained.unwrap();
    assert_eq!(
        (p.heads, p.checkpoint_key.as_deref()),
        (Some(6), Some("teacher"))
    );
    let e = LoadedSpec::from_str(&with("{ path: a.pth, head: 6 }"), "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml") && e.contains("defaults.pretrained") && e.contains("head"),
        "{e}"
    );
    let e = LoadedSpec::from_str(&with("{ path: a.pth, heads: 0 }"), "t.yaml", ".".into())
        .unwrap_err()
        .to_string();
    assert!(e.contains("defaults.pretrained.heads"), "{e}");
}

#[test]
fn every_shipped_spec_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name == "scales.yaml" {
            continue;
        }
        let spec = LoadedSpec::load(Some(&path)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for scale in ["smoke", "cpu", "paper"] {
            spec.scale(scale).unwrap();
        }
        n += 1;
    }
    assert!(n >= 15, "only {n} specs found");
}

/// The sweeps under `experiments/<name>/` (a `spec.yaml` and the `scales.yaml` beside it,
/// run by `scripts/eq3-sweep.sh`) load and plan at every scale they define.
#[test]
fn every_shipped_sweep_is_valid_at_each_of_its_scales() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let sweep = entry.unwrap().path();
        if !sweep.is_dir() {
            continue;
        }
        let path = sweep.join("spec.yaml");
        let spec =
            LoadedSpec::load(Some(&path)).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let scales = spec.scale_names().unwrap();
        assert!(scales.len() >= 2, "{}: {scales:?}", sweep.display());
        for name in scales {
            let mut scale = spec.scale(&name).unwrap();
            // Plan on the generated data with a small test split (CIFAR-10 needs files; a
            // scale's "all test images", 0, means nothing for generated data).
            let mut spec = spec.clone();
            spec.spec.grid.dataset = vec!["synthetic".into()];
            if scale.data.test == 0 || scale.data.test > 1000 {
                scale.data.test = 1000;
            }
            plan::plan(&spec, &scale, None)
                .unwrap_or_else(|e| panic!("{} at {name}: {e:#}", path.display()));
        }
        n += 1;
    }
    assert!(n >= 4, "only {n} sweeps found");
}

#[test]
fn embedded_scales_parse() {
    for name in ["smoke", "cpu", "paper"] {
        load_scale(DEFAULT_SCALES, "scales.yaml", name).unwrap();
    }
    let e = load_scale(DEFAULT_SCALES, "scales.yaml", "huge")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown scale 'huge'"), "{e}");
}

#[test]
fn per_dataset_settings_sit_between_defaults_and_variants() {
    let spec = GOOD
        .replace("dataset: [synthetic]", "dataset: [synthetic, cifar10]")
        .replace(
            "name: t",
            "name: t\ndefaults: { ieu: { c_thresh: 0.97 } }\n\
             per_dataset: { cifar10: { ieu: { c_thresh: 0.9, stage1_loss: { lga: 1.0 } } } }\n\
             variants:\n  ieu-nm: { base: ieu, ieu: { logit_masking: false, c_thresh: 0.8 } }",
        )
        .replace("defence: [none, ieu]", "defence: [none, ieu, ieu-nm]");
    let s = LoadedSpec::from_str(&spec, "t.yaml", ".".into()).unwrap();
    let ieu = |entry: &str, ds: Option<&str>| {
        <crate::defences::ieu::IeuSettings as crate::defences::Settings>::of(
            &s.spec.defence_settings_for(entry, ds).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(ieu("ieu", Some("synthetic")).c_thresh, 0.97);
    let c = ieu("ieu", Some("cifar10"));
    assert_eq!(c.c_thresh, 0.9);
    assert_eq!(c.stage1_loss, crate::train::LossKind::Lga(1.0));
    // A variant's own settings come last; the dataset's others still apply.
    let v = ieu("ieu-nm", Some("cifar10"));
    assert!(v.c_thresh == 0.8 && !v.logit_masking);
    assert_eq!(v.stage1_loss, crate::train::LossKind::Lga(1.0));
    assert_eq!(
        s.spec
            .ieu_defaults_at(Some("cifar10"), None)
            .unwrap()
            .c_thresh,
        0.9
    );

    for (bad, want) in [
        ("c_thresh: 0.9,", "per_dataset.cifar10.ieu.c_thresh"),
        ("cifar10: { ieu", "per_dataset.mnist"),
        (
            "cifar10: { ieu: { c_thresh: 0.9,",
            "per_dataset.cifar10.iue",
        ),
    ] {
        let t = match bad {
            "c_thresh: 0.9," => spec.replace(bad, "c_thresh: 1.9,"),
            "cifar10: { ieu" => spec.replace(bad, "mnist: { ieu"),
            _ => spec.replace(bad, "cifar10: { iue: { c_thresh: 0.9,"),
        };
        let e = LoadedSpec::from_str(&t, "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.yaml") && e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn a_scales_defence_settings_replace_the_built_in_defaults_and_nothing_a_spec_states() {
    // A scale whose model needs another gate threshold than the paper's.
    let smoke = load_scale(DEFAULT_SCALES, "scales.yaml", "smoke").unwrap();
    let mut scale = smoke.clone();
    scale.defences.insert(
        "ieu".into(),
        serde_yaml_ng::from_str("{ c_thresh: 0.99 }").unwrap(),
    );
    let c = |spec: &LoadedSpec, ds: &str, sc: &Scale| {
        spec.spec
            .ieu_defaults_at(Some(ds), Some(sc))
            .unwrap()
            .c_thresh
    };
    // The spec states nothing: the scale's value, and the built-in one without a scale.
    let plain = LoadedSpec::from_str(GOOD, "t.yaml", ".".into()).unwrap();
    assert_eq!(c(&plain, "synthetic", &scale), 0.99);
    assert_eq!(c(&plain, "synthetic", &smoke), 0.95);
    assert_eq!(
        plain
            .spec
            .ieu_defaults_at(Some("synthetic"), None)
            .unwrap()
            .c_thresh,
        0.95
    );
    // The scale's other fields stay the defence's defaults.
    let s = plain.spec.ieu_defaults_at(None, Some(&scale)).unwrap();
    assert!(s.logit_masking && s.fp_depth == 1, "{s:?}");
    // What the spec states wins: `defaults.ieu`, then `per_dataset`, then a variant.
    let stated = GOOD
        .replace("dataset: [synthetic]", "dataset: [synthetic, cifar10]")
        .replace(
            "name: t",
            "name: t\ndefaults: { ieu: { c_thresh: 0.95 } }\n\
             per_dataset: { cifar10: { ieu: { c_thresh: 0.9 } } }\n\
             variants:\n  ieu-8: { base: ieu, ieu: { c_thresh: 0.8 } }",
        )
        .replace("defence: [none, ieu]", "defence: [none, ieu, ieu-8]");
    let stated = LoadedSpec::from_str(&stated, "t.yaml", ".".into()).unwrap();
    assert_eq!(c(&stated, "synthetic", &scale), 0.95);
    assert_eq!(c(&stated, "cifar10", &scale), 0.9);
    let v = stated
        .spec
        .defence_settings_at("ieu-8", Some("synthetic"), Some(&scale))
        .unwrap();
    assert_eq!(v["c_thresh"], 0.8);

    // The plan hashes the resolved value: the scale's threshold reaches the IEU finetune.
    let p = plan::plan(&plain, &scale, None).unwrap();
    let p0 = plan::plan(&plain, &smoke, None).unwrap();
    let ieu_key = |p: &crate::dag::Plan| {
        p.steps
            .iter()
            .find(|s| s.label.contains("/ieu") && s.label.starts_with("finetune"))
            .map(|s| (s.key.clone(), s.params.to_string()))
            .unwrap()
    };
    let ((k, params), (k0, _)) = (ieu_key(&p), ieu_key(&p0));
    assert_ne!(k, k0);
    assert!(params.contains("0.99"), "{params}");

    // A scale's bad entry names the file, the scale and the field.
    for (text, want) in [
        (
            "defences: { iue: { c_thresh: 0.99 } }",
            "smoke.defences.iue",
        ),
        ("defences: { ieu: { c_thresh: 1.5 } }", "smoke.defences.ieu"),
        ("defences: { ieu: { c_tresh: 0.99 } }", "smoke.defences.ieu"),
        (
            "defences: { none: { c_thresh: 0.99 } }",
            "smoke.defences.none",
        ),
    ] {
        let e = smoke_scale_error(
            "  stegastamp: { train_images: 320",
            &format!("  {text}\n  stegastamp: {{ train_images: 320"),
        );
        assert!(e.contains("scales.yaml") && e.contains(want), "{text}: {e}");
    }
}

#[test]
fn a_datasets_own_pretrain_epochs_reach_its_pretrain_step_only() {
    let base = load_scale(DEFAULT_SCALES, "scales.yaml", "smoke").unwrap();
    let mut scale = base.clone();
    scale
        .pretrain
        .epochs_per_dataset
        .insert("synthetic".into(), base.pretrain.epochs + 7);
    assert_eq!(
        scale.pretrain.epochs_on("synthetic"),
        base.pretrain.epochs + 7
    );
    assert_eq!(scale.pretrain.epochs_on("cifar10"), base.pretrain.epochs);
    let spec = LoadedSpec::from_str(GOOD, "t.yaml", ".".into()).unwrap();
    let pretrain = |p: &crate::dag::Plan| {
        p.steps
            .iter()
            .find(|s| s.label == "pretrain synthetic")
            .map(|s| (s.key.clone(), s.params["epochs"].as_u64().unwrap()))
            .unwrap()
    };
    let (k, e) = pretrain(&plan::plan(&spec, &scale, None).unwrap());
    let (k0, e0) = pretrain(&plan::plan(&spec, &base, None).unwrap());
    assert_eq!(
        (e, e0),
        (base.pretrain.epochs as u64 + 7, base.pretrain.epochs as u64)
    );
    assert_ne!(k, k0);
    // A name that is no built-in dataset and none of the spec's `datasets:` sets nothing,
    // and the spec says so (a warning: one scales file serves many specs).
    assert!(spec.unknown_pretrain_datasets(&scale).is_empty());
    scale
        .pretrain
        .epochs_per_dataset
        .insert("cifar1O".into(), 5);
    assert_eq!(spec.unknown_pretrain_datasets(&scale), ["cifar1O"]);
    // Fewer epochs than the warm-up (or none) is an error naming the entry.
    let e = smoke_scale_error(
        "pretrain: { view: flip, epochs: 60,",
        "pretrain: { epochs_per_dataset: { synthetic: 0 }, view: flip, epochs: 60,",
    );
    assert!(
        e.contains("smoke.pretrain.epochs_per_dataset.synthetic"),
        "{e}"
    );
}

/// The error of loading the embedded smoke scale with `from` replaced by `to` (once).
fn smoke_scale_error(from: &str, to: &str) -> String {
    let scales = DEFAULT_SCALES.replacen(from, to, 1);
    assert_ne!(
        scales, DEFAULT_SCALES,
        "{from:?} is not in the embedded scales"
    );
    load_scale(&scales, "scales.yaml", "smoke")
        .unwrap_err()
        .to_string()
}
