//! End-to-end behaviour of the `ieu-bench` binary at smoke scale.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn bin() -> Command {
    let mut c = Command::cargo_bin("ieu-bench").unwrap();
    c.env_remove("IEU_STORE")
        .env_remove("IEU_DATA_DIR")
        .env("RUST_LOG", "warn");
    c
}

fn stdout(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The stderr of a command that must fail.
fn stderr_of(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "succeeded unexpectedly");
    String::from_utf8(out.stderr).unwrap()
}

/// Writes a `scales.yaml` into `dir` whose smoke scale has the embedded one's shapes with
/// fewer images and epochs: for tests that check plumbing (every architecture, every
/// ablation spec runs), not learning.
fn quick_smoke_scales(dir: &Path) {
    let scales = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/scales.yaml"),
    )
    .unwrap();
    let mut quick = scales.clone();
    for (from, to) in [
        (
            "data: { pretrain: 1280, tune: 1280, test: 320 }",
            "data: { pretrain: 320, tune: 320, test: 160 }",
        ),
        (
            "pretrain: { view: flip, epochs: 60,",
            "pretrain: { view: flip, epochs: 2,",
        ),
        ("stage1: { epochs: 15,", "stage1: { epochs: 2,"),
        ("finetune: { epochs: 15,", "finetune: { epochs: 2,"),
    ] {
        assert!(quick.contains(from), "smoke scale has no {from:?}");
        quick = quick.replacen(from, to, 1);
    }
    std::fs::write(dir.join("scales.yaml"), quick).unwrap();
}

fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    p.join("cifar-10-batches-bin/data_batch_1.bin")
        .is_file()
        .then_some(p)
}

#[test]
fn smoke_run_then_fully_cached_rerun() {
    let store = tempfile::tempdir().unwrap();
    let s = store.path().to_str().unwrap();

    let plan = stdout(bin().args(["run", "--scale", "smoke", "--store", s, "--dry-run"]));
    assert!(
        plan.contains("plan: 14 steps, 0 cached, 14 to run"),
        "{plan}"
    );

    let first = stdout(bin().args(["run", "--scale", "smoke", "--store", s]));
    assert!(
        first.contains("done: 14 steps, 14 run, 0 cached"),
        "{first}"
    );
    // One CSV row per grid cell with the required columns.
    let csv = stdout(bin().args([
        "report", "--scale", "smoke", "--store", s, "--format", "csv",
    ]));
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("dataset,attack,defence,asr,ca")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for r in &rows {
        let f: Vec<&str> = r.split(',').collect();
        let asr: f64 = f[3].parse().unwrap();
        let ca: f64 = f[4].parse().unwrap();
        assert!(
            (0.0..=100.0).contains(&asr) && (0.0..=100.0).contains(&ca),
            "{r}"
        );
        if f[2] == "ieu" {
            assert!(
                !f[5].is_empty() && !f[6].is_empty(),
                "IEU rows carry FPR/FNR: {r}"
            );
        }
    }
    // The smoke scale learns: CA well above chance (10 classes), the backdoor learned
    // without defence, and IEU unlearns and lowers ASR while keeping most of the CA, its
    // gate sending few clean images to the unlearn set (the paper's picture). (Blended is
    // the attack the smoke scale learns reliably: BadNets-white's 3-pixel square is learned
    // weakly by its 8x8 patches.)
    let cell = |attack: &str, defence: &str| -> Vec<f64> {
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("synthetic,{attack},{defence},")))
            .unwrap();
        row.split(',')
            .skip(3)
            .take(7)
            .map(|v| v.parse().unwrap_or(f64::NAN))
            .collect()
    };
    let (none, ieu) = (cell("blended", "none"), cell("blended", "ieu"));
    let (asr, ca, clean_flagged, unlearn_steps) = (0, 1, 5, 6);
    assert!(none[ca] > 25.0, "CA near chance: {csv}");
    assert!(none[asr] > 40.0, "no backdoor learned: {csv}");
    assert!(ieu[unlearn_steps] > 0.0, "IEU unlearned nothing: {csv}");
    assert!(ieu[asr] < none[asr] - 10.0, "IEU did not lower ASR: {csv}");
    assert!(
        ieu[clean_flagged] < 10.0,
        "the gate flags many clean images: {csv}"
    );
    assert!(
        ieu[ca] > none[ca] - 10.0,
        "IEU lost the clean accuracy: {csv}"
    );

    // Eq. 3's trace of that cell: one CSV row per unlearned batch, and the figure.
    let figs = tempfile::tempdir().unwrap();
    let spec = figs.path().join("default.yaml");
    let default = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/default.yaml"),
    )
    .unwrap();
    std::fs::write(
        &spec,
        format!(
            "{default}figures:\n  - name: eq3\n    title: Eq. 3\n    kind: unlearn_rate\n    \
             panels: [{{ dataset: synthetic, attack: blended, defence: ieu }}]\n"
        ),
    )
    .unwrap();
    stdout(
        bin()
            .arg("report")
            .arg(&spec)
            .args(["--scale", "smoke", "--store", s, "--figures"])
            .arg(figs.path()),
    );
    let trace = std::fs::read_to_string(figs.path().join("eq3.csv")).unwrap();
    assert_eq!(
        trace.lines().count() - 1,
        ieu[unlearn_steps] as usize,
        "{trace}"
    );
    let first = trace.lines().nth(1).unwrap();
    assert!(
        first.contains(",0,,1,"),
        "k = 0, no previous loss, factor 1: {first}"
    );
    assert!(figs.path().join("eq3.png").is_file());

    // Everything cached: nothing trains, the dry run says so.
    let again = stdout(bin().args(["run", "--scale", "smoke", "--store", s]));
    assert!(
        again.contains("done: 14 steps, 0 run, 14 cached"),
        "{again}"
    );
    let plan = stdout(bin().args(["run", "--scale", "smoke", "--store", s, "--dry-run"]));
    assert!(
        plan.contains("plan: 14 steps, 14 cached, 0 to run"),
        "{plan}"
    );

    // Markdown mirrors the table layout, with an averages row.
    let md = stdout(bin().args(["report", "--scale", "smoke", "--store", s]));
    assert!(
        md.contains("| Dataset | Attack |") && md.contains("none ASR") && md.contains("ieu CA"),
        "{md}"
    );
    assert!(md.contains("*Average*"), "{md}");

    // `show` prints a manifest found by a hash prefix, and its outputs verify.
    let key = rows[1].rsplit(',').next().unwrap();
    let show = stdout(bin().args(["show", &key[..10], "--store", s, "--verify"]));
    assert!(
        show.contains("\"kind\": \"evaluate\"")
            && show.contains("metrics.json")
            && show.contains("verified"),
        "{show}"
    );
}

#[test]
fn same_spec_same_metrics_whatever_the_parallelism() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let args = |s: &Path| {
        vec![
            "run".to_string(),
            "--scale".into(),
            "smoke".into(),
            "--store".into(),
            s.display().to_string(),
            "--only".into(),
            "attack=badnets-white".into(),
        ]
    };
    // Different --jobs, same results: every step is seeded and single-threaded.
    stdout(bin().args(args(a.path())).args(["--jobs", "2"]));
    stdout(bin().args(args(b.path())).args(["--jobs", "1"]));
    let csv = |s: &Path| {
        stdout(
            bin()
                .args([
                    "report",
                    "--scale",
                    "smoke",
                    "--format",
                    "csv",
                    "--only",
                    "attack=badnets-white",
                    "--store",
                ])
                .arg(s),
        )
    };
    assert_eq!(csv(a.path()), csv(b.path()));
}

#[test]
fn bad_spec_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "name: x\ntitle: X\ndefaults: { poison_rate: 0.1, colour: red }\ngrid: { dataset: [synthetic], attack: [badnets-white], defence: [none] }\nreport: { rows: [dataset, attack], columns: defence, metrics: [asr] }\n",
    )
    .unwrap();
    bin()
        .args(["run"])
        .arg(&spec)
        .args(["--store"])
        .arg(dir.path().join("st"))
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("bad.yaml")
                .and(predicate::str::contains("colour"))
                .and(predicate::str::contains("panicked").not()),
        );
}

#[test]
fn missing_dataset_says_what_is_expected_where() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table3.yaml");
    bin()
        .args(["run"])
        .arg(&spec)
        .args([
            "--only",
            "dataset=cifar10",
            "--only",
            "attack=badnets-white",
            "--only",
            "defence=none",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--store")
        .arg(dir.path().join("st"))
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("CIFAR-10 not found")
                .and(predicate::str::contains("cifar-10-batches-bin")),
        );
}

#[test]
fn cli_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    bin()
        .args(["run", "--scale", "huge", "--store"])
        .arg(dir.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains("unknown scale 'huge'"));
    bin()
        .args(["run", "--only", "colour=red", "--store"])
        .arg(dir.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains("unknown axis 'colour'"));
    bin()
        .args(["show", "abcdef", "--store"])
        .arg(dir.path())
        .assert()
        .code(1);
}

#[test]
fn real_cifar10_smoke_slice() {
    let Some(data) = shared_data() else {
        eprintln!("skipped: ../shared/data/cifar-10-batches-bin not present");
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table3.yaml");
    let out = stdout(
        bin()
            .args(["run"])
            .arg(&spec)
            .args([
                "--scale",
                "smoke",
                "--only",
                "dataset=cifar10",
                "--only",
                "attack=badnets-white",
                "--only",
                "defence=none,ieu",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--store")
            .arg(store.path()),
    );
    assert!(
        out.contains("cifar10,badnets-white,none") && out.contains("cifar10,badnets-white,ieu"),
        "{out}"
    );
}

#[test]
fn every_attack_runs_end_to_end_at_smoke_scale() {
    // The Table 3 attacks plus WaNet (Table 10's shape) through the whole DAG on the
    // synthetic dataset: poison, no defence and IEU, metrics.
    let dir = tempfile::tempdir().unwrap();
    quick_smoke_scales(dir.path());
    let spec = dir.path().join("attacks.yaml");
    std::fs::write(
        &spec,
        "name: attacks\ntitle: All attacks\ngrid:\n  dataset: [synthetic]\n  attack: [badnets-pattern, trojan-sq, trojan-wm, l0-inv, l2-inv, smooth, sig, batt, wanet]\n  defence: [none, ieu]\nreport: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n",
    )
    .unwrap();
    let out = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(["--scale", "smoke", "--store"])
            .arg(dir.path().join("st")),
    );
    for a in [
        "badnets-pattern",
        "trojan-sq",
        "trojan-wm",
        "l0-inv",
        "l2-inv",
        "smooth",
        "sig",
        "batt",
        "wanet",
    ] {
        assert!(
            out.contains(&format!("synthetic,{a},none,"))
                && out.contains(&format!("synthetic,{a},ieu,")),
            "{a} missing:\n{out}"
        );
    }
}

#[test]
fn table10_plans_wanet_on_cifar10() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table10.yaml");
    let Some(data) = shared_data() else {
        eprintln!("skipped: ../shared/data/cifar-10-batches-bin not present");
        return;
    };
    let plan = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args([
                "--scale",
                "smoke",
                "--dry-run",
                "--only",
                "defence=none,ieu",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--store")
            .arg(dir.path()),
    );
    assert!(
        plan.contains("poison cifar10/wanet") && plan.contains("plan: 8 steps, 0 cached, 8 to run"),
        "{plan}"
    );
}

#[test]
fn preview_draws_every_attack() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let msg = stdout(
        bin()
            .args(["preview", "--scale", "smoke", "--out"])
            .arg(&out),
    );
    assert!(msg.contains("13 attacks"), "{msg}");
    let img = image::open(&out).unwrap();
    assert!(img.height() > 13 * 96, "one row per attack");
}

#[test]
fn ablation_specs_run_at_smoke_scale() {
    // Tables 4, 6, 7, 9, 14 and 15 on the synthetic dataset (their datasets swapped), one attack.
    let dir = tempfile::tempdir().unwrap();
    quick_smoke_scales(dir.path());
    for table in ["table4", "table6", "table7", "table9", "table14", "table15"] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/{table}.yaml")),
        )
        .unwrap();
        let text = text
            .replace("[cifar10, tinyimagenet]", "[synthetic]")
            .replace("[cifar10]", "[synthetic]")
            .replace("{ dataset: cifar10,", "{ dataset: synthetic,");
        let spec = dir.path().join(format!("{table}.yaml"));
        std::fs::write(&spec, text).unwrap();
        let out = stdout(
            bin()
                .arg("run")
                .arg(&spec)
                .args([
                    "--scale",
                    "smoke",
                    "--only",
                    "attack=badnets-white",
                    "--store",
                ])
                .arg(dir.path().join("st")),
        );
        assert!(
            out.contains("synthetic,badnets-white,ieu,"),
            "{table}:\n{out}"
        );
        let md = stdout(
            bin()
                .arg("report")
                .arg(&spec)
                .args([
                    "--scale",
                    "smoke",
                    "--only",
                    "attack=badnets-white",
                    "--store",
                ])
                .arg(dir.path().join("st")),
        );
        assert!(
            md.contains("| synthetic | badnets-white |"),
            "{table}:\n{md}"
        );
    }
}

/// A copy of an experiments/ spec with its datasets swapped for the synthetic one.
fn synthetic_copy(table: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/{table}.yaml")),
    )
    .unwrap()
    .replace("[cifar10, gtsrb, tinyimagenet]", "[synthetic]")
    .replace("[cifar10, tinyimagenet]", "[synthetic]")
    .replace("[cifar10]", "[synthetic]")
    .replace("{ dataset: cifar10,", "{ dataset: synthetic,");
    let spec = dir.join(format!("{table}.yaml"));
    std::fs::write(&spec, text).unwrap();
    spec
}

/// A defence added through the registry alone (Fine-Pruning, `src/defences/fine_pruning.rs`)
/// plans from its spec section, shares the backdoored model, runs and is reported.
#[test]
fn a_registered_defence_runs_through_run_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("st");
    let spec = synthetic_copy("fine-pruning", dir.path());
    let args = |cmd: &str| {
        let mut c = bin();
        c.arg(cmd)
            .arg(&spec)
            .args([
                "--scale",
                "smoke",
                "--only",
                "attack=badnets-white",
                "--store",
            ])
            .arg(&store);
        c
    };
    // dataset, pretrain, poison; none (finetune, evaluate); two Fine-Pruning entries on
    // the none model (finetune, evaluate each); IEU (stage1, finetune, evaluate).
    let plan = stdout(args("run").arg("--dry-run"));
    assert!(
        plan.contains("plan: 12 steps, 0 cached, 12 to run"),
        "{plan}"
    );
    stdout(&mut args("run"));
    let csv = stdout(args("report").args(["--format", "csv"]));
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "ca_unseen").unwrap();
    for defence in ["fine-pruning", "fine-pruning-20"] {
        let row = csv
            .lines()
            .find(|l| l.starts_with(&format!("synthetic,badnets-white,{defence},")))
            .unwrap_or_else(|| panic!("{defence} missing:\n{csv}"));
        // It finetuned on clean test images: CA is also given without them.
        assert!(!row.split(',').nth(col).unwrap().is_empty(), "{csv}");
    }
    // Its settings are checked by the defence, naming the field.
    let bad = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("prune_step: 0.05", "prune_step: 1.5");
    std::fs::write(&spec, bad).unwrap();
    let err = stderr_of(args("run").arg("--dry-run"));
    assert!(
        err.contains("defaults.fine-pruning.prune_step") && err.contains("1.5"),
        "{err}"
    );
}

#[test]
fn baselines_run_at_smoke_scale_and_share_the_backdoored_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("st");
    let t3 = synthetic_copy("table3", dir.path());
    let run = |spec: &Path, extra: &[&str]| {
        stdout(
            bin()
                .arg("run")
                .arg(spec)
                .args(["--scale", "smoke", "--only", "attack=badnets-white"])
                .args(extra)
                .arg("--store")
                .arg(&store),
        )
    };
    // dataset, pretrain, poison; none (finetune, evaluate); I-BAU on the none model
    // (finetune, evaluate); ABL (isolate, finetune, evaluate); IEU (stage1, finetune,
    // evaluate).
    let plan = run(&t3, &["--dry-run"]);
    assert!(
        plan.contains("plan: 13 steps, 0 cached, 13 to run"),
        "{plan}"
    );
    let out = run(&t3, &[]);
    for defence in ["none", "ibau", "abl", "ieu"] {
        assert!(
            out.contains(&format!("synthetic,badnets-white,{defence},")),
            "{defence} missing:\n{out}"
        );
    }
    // ABL's isolation quality is reported like IEU's gate.
    let csv = stdout(
        bin()
            .arg("report")
            .arg(&t3)
            .args([
                "--scale",
                "smoke",
                "--only",
                "attack=badnets-white",
                "--format",
                "csv",
                "--store",
            ])
            .arg(&store),
    );
    assert!(csv.contains("synthetic,badnets-white,abl,"), "{csv}");
    // I-BAU unlearned with the first test images: CA is also given without them.
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "ca_unseen").unwrap();
    let ibau = csv
        .lines()
        .find(|l| l.starts_with("synthetic,badnets-white,ibau,"))
        .unwrap();
    assert!(!ibau.split(',').nth(col).unwrap().is_empty(), "{csv}");
    // AttnBlock is a test-time defence on the same backdoored model: only its evaluate
    // step is new.
    let t13 = synthetic_copy("table13", dir.path());
    let plan = run(&t13, &["--dry-run"]);
    assert!(plan.contains("plan: 6 steps, 5 cached, 1 to run"), "{plan}");
    let out = run(&t13, &[]);
    assert!(out.contains("synthetic,badnets-white,attnblock,"), "{out}");
}

#[test]
fn isolation_oracle_rate_and_target_specs_run_at_smoke_scale() {
    // Tables 1, 2, 5 and 17 on the synthetic dataset, a few of their entries each.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("st");
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "table1",
            &["attack=badnets-white-a0.02,badnets-white-a0.20"],
            "synthetic,badnets-white-a0.20,ieu-r-isol,",
        ),
        (
            "table2",
            &[
                "attack=badnets-white",
                "defence=ieu-oracle-0.5,ieu-oracle-2.0",
            ],
            "synthetic,badnets-white,ieu-oracle-2.0,",
        ),
        (
            "table5",
            &["attack=badnets-white-a0.05"],
            "synthetic,badnets-white-a0.05,ieu,",
        ),
        (
            "table17",
            &["attack=badnets-white-t0"],
            "synthetic,badnets-white-t0,ieu,",
        ),
    ];
    for (table, only, row) in cases {
        let spec = synthetic_copy(table, dir.path());
        let mut cmd = bin();
        cmd.arg("run").arg(&spec).args(["--scale", "smoke"]);
        for o in only {
            cmd.args(["--only", o]);
        }
        let out = stdout(cmd.arg("--store").arg(&store));
        assert!(out.contains(row), "{table}:\n{out}");
    }
    // Table 1 reports the isolation FPR/FNR of both selections.
    let spec = dir.path().join("table1.yaml");
    let md = stdout(
        bin()
            .arg("report")
            .arg(&spec)
            .args([
                "--scale",
                "smoke",
                "--only",
                "attack=badnets-white-a0.02,badnets-white-a0.20",
                "--store",
            ])
            .arg(&store),
    );
    assert!(md.contains("ieu-r-isol FPR"), "{md}");
    assert!(md.contains("| synthetic | badnets-white-a0.20 |"), "{md}");
}

#[test]
fn a_clean_finetuning_set_runs() {
    // Table 8's "No Attack": alpha = 0, no poisoned image; IEU must still finetune.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("clean.yaml");
    std::fs::write(
        &spec,
        r#"
name: clean
title: No attack
attack_variants:
  no-attack: { base: badnets-white, poison_rate: 0.0 }
variants:
  ieu-c0.99: { base: ieu, ieu: { c_thresh: 0.99 } }
grid: { dataset: [synthetic], attack: [no-attack], defence: [none, ieu-c0.99] }
report: { rows: [dataset, attack], columns: defence, metrics: [ca, clean_flagged] }
"#,
    )
    .unwrap();
    let out = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(["--scale", "smoke", "--store"])
            .arg(dir.path().join("st")),
    );
    assert!(out.contains("synthetic,no-attack,ieu-c0.99,"), "{out}");
}

#[test]
fn issba_runs_end_to_end_at_smoke_scale() {
    // dataset -> stegastamp (the trained encoder) -> poison(issba) -> defences -> metrics.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("issba.yaml");
    std::fs::write(
        &spec,
        "name: issba\ntitle: ISSBA\ngrid:\n  dataset: [synthetic]\n  attack: [issba]\n  defence: [none, ieu]\nreport: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n",
    )
    .unwrap();
    let store = dir.path().join("st");
    let plan = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(["--scale", "smoke", "--dry-run", "--store"])
            .arg(&store),
    );
    assert!(
        plan.contains("stegastamp synthetic") && plan.contains("plan: 9 steps, 0 cached, 9 to run"),
        "{plan}"
    );
    let out = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(["--scale", "smoke", "--store"])
            .arg(&store),
    );
    assert!(
        out.contains("synthetic,issba,none,") && out.contains("synthetic,issba,ieu,"),
        "{out}"
    );
}

#[test]
fn table18_runs_cat_at_smoke_scale() {
    // Table 18 on the synthetic dataset (its datasets swapped), one base attack:
    // dataset -> poison(badnets-white) -> stage1 f_p -> poison(cat+badnets-white) -> IEU / none.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table18.yaml"),
    )
    .unwrap()
    .replace("[cifar10, tinyimagenet]", "[synthetic]");
    let spec = dir.path().join("table18.yaml");
    std::fs::write(&spec, text).unwrap();
    let store = dir.path().join("st");
    let only = ["--scale", "smoke", "--only", "attack=cat+badnets-white"];
    let plan = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(only)
            .arg("--dry-run")
            .arg("--store")
            .arg(&store),
    );
    assert!(
        plan.contains("poison synthetic/badnets-white")
            && plan.contains("stage1 f_p synthetic/badnets-white")
            && plan.contains("poison synthetic/cat+badnets-white")
            && plan.contains("stage1 f_p synthetic/cat+badnets-white")
            && plan.contains("plan: 10 steps, 0 cached, 10 to run"),
        "{plan}"
    );
    let out = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(only)
            .arg("--store")
            .arg(&store),
    );
    assert!(
        out.contains("synthetic,cat+badnets-white,ieu,")
            && out.contains("synthetic,cat+badnets-white,none,"),
        "{out}"
    );
    let md = stdout(
        bin()
            .arg("report")
            .arg(&spec)
            .args(only)
            .arg("--store")
            .arg(&store),
    );
    assert!(md.contains("| synthetic | cat+badnets-white |"), "{md}");
}

#[test]
fn table18_plans_cat_on_cifar10() {
    let Some(data) = shared_data() else {
        eprintln!("skipped: ../shared/data/cifar-10-batches-bin not present");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table18.yaml");
    let plan = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args([
                "--scale",
                "smoke",
                "--dry-run",
                "--only",
                "dataset=cifar10",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--store")
            .arg(dir.path()),
    );
    // dataset, pretrain; per base: poison(base), its f_p, poison(cat), the defended f_p,
    // two finetunes, two evaluations.
    assert!(
        plan.contains("poison cifar10/cat+smooth")
            && plan.contains("plan: 42 steps, 0 cached, 42 to run"),
        "{plan}"
    );
}

#[test]
fn pretrained_checkpoint_shows_as_an_import_step() {
    use ieu_bench::models::{Vit, VitConfig, timm};
    let dir = tempfile::tempdir().unwrap();
    // A timm-layout checkpoint of the smoke scale's width (heads come from the scale).
    let cfg = VitConfig {
        image_size: 16,
        patch_size: 4,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 10,
    };
    let vit = Vit::new(&cfg, 5, &burn::prelude::Device::flex());
    timm::export(&vit, &cfg, &dir.path().join("vit.safetensors")).unwrap();
    let spec = dir.path().join("s.yaml");
    std::fs::write(
        &spec,
        "name: s\ntitle: S\ndefaults: { pretrained: vit.safetensors }\n\
         grid: { dataset: [synthetic], attack: [badnets-white], defence: [none] }\n\
         report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n",
    )
    .unwrap();
    let st = dir.path().join("st");
    let plan = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(["--scale", "smoke", "--dry-run", "--store"])
            .arg(&st),
    );
    let line = plan
        .lines()
        .find(|l| l.contains("import vit.safetensors"))
        .unwrap_or_else(|| panic!("no import step:\n{plan}"));
    assert!(!plan.contains(" pretrain "), "{plan}");
    assert!(plan.contains("plan: 5 steps, 0 cached, 5 to run"), "{plan}");
    let hash = line.split_whitespace().nth(2).unwrap().to_string();
    let run = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args(["--scale", "smoke", "--store"])
            .arg(&st),
    );
    assert!(run.contains("done: 5 steps, 5 run"), "{run}");
    let show = stdout(bin().args(["show", &hash, "--store"]).arg(&st));
    assert!(
        show.contains("\"kind\": \"import\"") && show.contains("\"digest\""),
        "{show}"
    );
}

#[test]
fn table8_runs_other_architectures_at_smoke_scale() {
    // Table 8 on the synthetic dataset: all seven architectures for f_r, each without a
    // defence and with IEU (f_p always from the ViT checkpoint).
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/table8.yaml"),
    )
    .unwrap()
    .replace("dataset: [cifar10]", "dataset: [synthetic]");
    let spec = dir.path().join("table8.yaml");
    std::fs::write(&spec, text).unwrap();
    quick_smoke_scales(dir.path());
    let out = stdout(
        bin()
            .arg("run")
            .arg(&spec)
            .args([
                "--scale",
                "smoke",
                "--only",
                "attack=badnets-white",
                "--store",
            ])
            .arg(dir.path().join("st")),
    );
    for arch in ["", "-deit", "-cait", "-pit", "-xcit", "-resnet18", "-vgg11"] {
        for d in [format!("none{arch}"), format!("ieu{arch}")] {
            assert!(
                out.contains(&format!("synthetic,badnets-white,{d},")),
                "{d} missing:\n{out}"
            );
        }
    }
    assert!(out.contains("done: 38 steps, 38 run"), "{out}");
}

#[test]
fn several_seeds_run_and_report_mean_and_deviation() {
    let dir = tempfile::tempdir().unwrap();
    quick_smoke_scales(dir.path());
    let spec = dir.path().join("default.yaml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/default.yaml"),
    )
    .unwrap();
    let figure = "figures:\n  - name: conf\n    title: CDF\n    c_thresh: 0.95\n    panels:\n      - { dataset: synthetic, attack: blended, defence: ieu, title: Blended }\n";
    std::fs::write(&spec, format!("{text}{figure}")).unwrap();
    let store = dir.path().join("st");
    let with = |seeds: &str, extra: &[&str]| {
        let mut c = bin();
        c.arg(extra[0]).arg(&spec).args(&extra[1..]).args([
            "--scale",
            "smoke",
            "--only",
            "attack=blended",
            "--seed",
            seeds,
            "--store",
        ]);
        c.arg(&store);
        stdout(&mut c)
    };
    let plan = with("1,2", &["run", "--dry-run"]);
    assert!(plan.contains("over seeds 1, 2"), "{plan}");
    // Per seed: dataset, pretrain, poison, none (finetune, evaluate), IEU (stage 1,
    // finetune, evaluate); nothing shared across seeds.
    assert!(
        plan.contains("plan: 16 steps, 0 cached, 16 to run"),
        "{plan}"
    );
    with("1,2", &["run"]);
    let md = with("1,2", &["report"]);
    assert!(
        md.contains("the mean ± the standard deviation over seeds 1, 2"),
        "{md}"
    );
    assert!(md.contains(" ± "), "{md}");
    // The gate's columns do not apply to no defence: `–` in its rows and in the averages
    // row, never `…` (not yet computed).
    let average = md.lines().find(|l| l.contains("*Average*")).unwrap();
    assert!(average.contains("| – |") && !average.contains('…'), "{md}");
    // A figure draws one run, and its panel says which.
    let figs = dir.path().join("figs");
    with("1,2", &["report", "--figures", figs.to_str().unwrap()]);
    let svg = std::fs::read_to_string(figs.join("conf.svg")).unwrap();
    assert!(svg.contains("Blended (seed 1)"), "{svg}");
    let csv = with("1,2", &["report", "--format", "csv"]);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|r| r.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 2, "{csv}");
    // Each seed alone, from the same store: the folded row is their mean.
    let alone = |seed: &str| -> Vec<f64> {
        let csv = with(seed, &["report", "--format", "csv"]);
        csv.lines()
            .skip(1)
            .map(|r| r.split(',').nth(col("ca")).unwrap().parse().unwrap())
            .collect()
    };
    let (one, two) = (alone("1"), alone("2"));
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[col("seeds")], "1 2", "{csv}");
        assert_eq!(row[col("evaluate_step")].split(' ').count(), 2, "{csv}");
        let mean: f64 = row[col("ca")].parse().unwrap();
        let sd: f64 = row[col("ca_sd")].parse().unwrap();
        let (a, b) = (one[i], two[i]);
        assert!((mean - (a + b) / 2.0).abs() <= 0.011, "{a} {b} → {mean}");
        let want = (a - b).abs() / 2f64.sqrt();
        assert!((sd - want).abs() <= 0.011, "{a} {b} → sd {sd}, want {want}");
    }
}
