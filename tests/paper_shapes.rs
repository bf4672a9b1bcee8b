//! The whole DAG at the `paper` scale's shapes — 224×224 images, ViT-S/16 (384 wide, 12
//! blocks, 6 heads) and the StegaStamp at 224² — with a handful of images and one epoch,
//! on the CPU backend: every step kind (dataset, stegastamp, poison, pretrain, import,
//! stage1, isolate, finetune, evaluate) and every defence runs, so shape and memory errors
//! at paper size show here and not on a GPU cluster. Slow (minutes), not timed.

use std::path::Path;

use assert_cmd::Command;

fn bin() -> Command {
    let mut c = Command::cargo_bin("ieu-bench").unwrap();
    c.env_remove("IEU_STORE")
        .env_remove("IEU_DATA_DIR")
        .env("RUST_LOG", "warn");
    c
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The embedded `paper` scale with tiny data, one epoch and small batches.
fn paper_shapes_scale() -> String {
    let scales = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/scales.yaml"),
    )
    .unwrap();
    let paper = &scales[scales.find("\npaper:").unwrap() + 1..];
    let mut s = paper.replacen("paper:", "paper-shapes:", 1);
    for (from, to) in [
        (
            "data: { pretrain: 25000, tune: 25000, test: 0 }",
            "data: { pretrain: 8, tune: 16, test: 8 }",
        ),
        ("batch_size: 64\n", "batch_size: 4\n"),
        ("eval_batch_size: 256", "eval_batch_size: 8"),
        ("epochs: 100, lr: 5.0e-4", "epochs: 1, lr: 5.0e-4"),
        ("warmup_epochs: 5", "warmup_epochs: 0"),
        ("stage1: { epochs: 10,", "stage1: { epochs: 1,"),
        ("finetune: { epochs: 10,", "finetune: { epochs: 1,"),
        ("ibau_clean_images: 5000", "ibau_clean_images: 4"),
        (
            "stegastamp: { train_images: 0, epochs: 20, lr: 1.0e-4, batch_size: 32,",
            "stegastamp: { train_images: 4, epochs: 1, lr: 1.0e-4, batch_size: 2,",
        ),
    ] {
        assert!(s.contains(from), "the paper scale no longer has {from:?}");
        s = s.replace(from, to);
    }
    assert!(s.contains("image_size: 224") && s.contains("patch_size: 16, dim: 384, depth: 12"));
    s
}

const SPEC: &str = r#"
name: paper-shapes
title: "Every step kind at the paper's shapes"
defaults:
  seed: 0
  poison_rate: 0.25
  target: 1
  attacks:
    cat: { iterations: 1 }
  abl: { r_isol: 0.25, finetune_epochs: 1, unlearn_epochs: 1 }
  ibau: { rounds: 1, fixed_point_iters: 1, batch_size: 4 }
  fine-pruning: { prune_step: 0.5, epochs: 1 }
grid:
  dataset: [synthetic]
  attack: [badnets-white, issba, cat+blended]
  defence: [none, ieu, abl, ibau, attnblock, fine-pruning]
report:
  rows: [dataset, attack]
  columns: defence
  metrics: [asr, ca]
"#;

#[test]
fn every_step_kind_and_defence_runs_at_the_paper_shapes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("scales.yaml"), paper_shapes_scale()).unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, SPEC).unwrap();
    let store = dir.path().join("store");
    let run = |spec: &Path| {
        let mut c = bin();
        c.arg("run")
            .arg(spec)
            .args(["--scale", "paper-shapes", "--jobs", "1", "--store"])
            .arg(&store);
        c
    };
    let plan = ok(run(&spec).arg("--dry-run"));
    for kind in [
        "dataset",
        "stegastamp",
        "poison",
        "pretrain",
        "stage1",
        "isolate",
        "finetune",
        "evaluate",
    ] {
        assert!(
            plan.contains(&format!(" {kind} ")),
            "no {kind} step:\n{plan}"
        );
    }
    ok(&mut run(&spec));
    let csv = ok(bin()
        .arg("report")
        .arg(&spec)
        .args(["--scale", "paper-shapes", "--format", "csv", "--store"])
        .arg(&store));
    assert_eq!(csv.lines().count(), 1 + 3 * 6, "{csv}");

    // The import step: a ViT-S/16 checkpoint at 224² exported from the pretrain step,
    // imported as `defaults.pretrained` and finetuned.
    let list = ok(bin()
        .args(["ls", "--kind", "pretrain", "--store"])
        .arg(&store));
    let key = list
        .lines()
        .find(|l| l.starts_with("pretrain "))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("a stored pretrain step");
    let ckpt = dir.path().join("vit-s16.safetensors");
    ok(bin()
        .args(["export", key, "--out"])
        .arg(&ckpt)
        .arg("--store")
        .arg(&store));
    let imported = dir.path().join("imported.yaml");
    std::fs::write(
        &imported,
        SPEC.replace(
            "  seed: 0\n",
            "  seed: 0\n  pretrained: vit-s16.safetensors\n",
        )
        .replace(
            "attack: [badnets-white, issba, cat+blended]",
            "attack: [badnets-white]",
        )
        .replace(
            "defence: [none, ieu, abl, ibau, attnblock, fine-pruning]",
            "defence: [none, ieu]",
        ),
    )
    .unwrap();
    let plan = ok(run(&imported).arg("--dry-run"));
    assert!(plan.contains(" import "), "{plan}");
    ok(&mut run(&imported));
}
