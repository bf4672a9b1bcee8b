//! The store's promises, through the binary: verified reads (tampered objects are named,
//! quarantined and recomputed), one computation per step under concurrent runs (also when
//! one is killed), failures that end cleanly, and bad settings refused before any work.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

mod common;
use common::{cmd, ok};

fn run(args: &[&str]) -> Output {
    common::out(&mut cmd(args))
}

fn stderr(o: &Output) -> String {
    common::err_of(o)
}

/// The CSV part of `run`'s output (everything but the final `done:` line).
fn csv_of(stdout: &str) -> String {
    stdout
        .lines()
        .filter(|l| !l.starts_with("done:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `N run` from `run`'s summary line.
fn ran(stdout: &str) -> usize {
    let done = stdout.lines().find(|l| l.starts_with("done:")).unwrap();
    let part = done.split(", ").find(|p| p.ends_with(" run")).unwrap();
    part.trim_end_matches(" run").parse().unwrap()
}

fn objects(store: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(store.join("objects")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The object directory of the first `ls` row of `kind`.
fn object_of_kind(store: &Path, kind: &str) -> PathBuf {
    let ls = ok(&["ls", "--store", store.to_str().unwrap(), "--kind", kind]);
    let short = ls
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap();
    objects(store)
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(short))
        .unwrap()
}

#[test]
fn tampered_metrics_and_models_are_named_quarantined_and_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let s = store.to_str().unwrap();
    let first = ok(&["run", "--scale", "smoke", "--store", s]);
    let want = csv_of(&first);
    let report = ok(&[
        "report", "--scale", "smoke", "--store", s, "--format", "csv",
    ]);

    // 1. A metrics file edited to a better CA.
    let eval = object_of_kind(&store, "evaluate");
    let metrics = eval.join("metrics.json");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let ca_line = text
        .lines()
        .find(|l| l.contains("\"ca\""))
        .unwrap()
        .to_string();
    std::fs::write(&metrics, text.replace(&ca_line, "  \"ca\": 99.375,")).unwrap();
    let key = eval.file_name().unwrap().to_string_lossy().into_owned();
    let out = run(&[
        "report", "--scale", "smoke", "--store", s, "--format", "csv",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&key) && err.contains("metrics.json"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("99.38"));
    assert!(!eval.exists(), "the damaged object left objects/");
    assert_eq!(
        std::fs::read_dir(store.join("quarantine")).unwrap().count(),
        1
    );
    let again = ok(&["run", "--scale", "smoke", "--store", s]);
    assert_eq!(ran(&again), 1, "{again}");
    assert_eq!(csv_of(&again), want);

    // 2. One flipped byte in the pretrained model: `verify` names it and fails.
    let pre = object_of_kind(&store, "pretrain");
    let model = pre.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&model, &bytes).unwrap();
    let pkey = pre.file_name().unwrap().to_string_lossy().into_owned();
    let out = run(&["verify", "--store", s]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&pkey) && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 damaged"));
    ok(&["verify", "--store", s]); // what is left is intact

    // 3. The same damage found by `run` itself, when a step needs the model: it is
    // quarantined and recomputed before anything is built on it.
    ok(&["run", "--scale", "smoke", "--store", s]);
    let pre = object_of_kind(&store, "pretrain");
    let model = pre.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[mid] ^= 1;
    std::fs::write(&model, &bytes).unwrap();
    std::fs::remove_dir_all(object_of_kind(&store, "finetune")).unwrap();
    let out = run(&["run", "--scale", "smoke", "--store", s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        stdout.contains("1 damaged objects quarantined and recomputed"),
        "{stdout}"
    );
    assert_eq!(ran(&stdout), 2, "{stdout}");
    assert_eq!(csv_of(&stdout), want);
    assert_eq!(
        ok(&[
            "report", "--scale", "smoke", "--store", s, "--format", "csv"
        ]),
        report
    );
}

/// A copy of the default spec with a `scales.yaml` beside it holding the smoke scale (a
/// few seconds per step, so concurrent runs overlap).
fn slower_spec(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("experiments/default.yaml"), dir.join("spec.yaml")).unwrap();
    let scales = std::fs::read_to_string(root.join("experiments/scales.yaml")).unwrap();
    let smoke = &scales[..scales.find("\ncpu:").unwrap()];
    assert!(smoke.contains("pretrain: { view: flip, epochs: 60,"));
    std::fs::write(dir.join("scales.yaml"), smoke).unwrap();
    dir.join("spec.yaml")
}

fn spawn_run(spec: &Path, store: &Path) -> std::process::Child {
    cmd(&[
        "run",
        spec.to_str().unwrap(),
        "--scale",
        "smoke",
        "--store",
        store.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// A run of `spec` alone into `store`: its output and the number of steps.
fn solo_run(spec: &Path, store: &Path) -> (String, usize) {
    let out = ok(&[
        "run",
        spec.to_str().unwrap(),
        "--scale",
        "smoke",
        "--store",
        store.to_str().unwrap(),
    ]);
    (out, objects(store).len())
}

#[test]
fn concurrent_runs_compute_every_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = slower_spec(dir.path());
    let (solo, total) = solo_run(&spec, &dir.path().join("solo"));
    assert_eq!(ran(&solo), total);

    let shared = dir.path().join("shared");
    let a = spawn_run(&spec, &shared);
    let b = spawn_run(&spec, &shared);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    let (sa, sb) = (
        String::from_utf8(a.stdout).unwrap(),
        String::from_utf8(b.stdout).unwrap(),
    );
    assert_eq!(
        ran(&sa) + ran(&sb),
        total,
        "every step computed exactly once:\n{sa}\n{sb}"
    );
    assert_eq!(csv_of(&sa), csv_of(&solo));
    assert_eq!(csv_of(&sb), csv_of(&solo));
    // Each manifest was written once, by one of the two processes.
    assert_eq!(objects(&shared).len(), total);
}

#[test]
fn four_concurrent_runs_survive_a_kill_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let spec = slower_spec(dir.path());
    let (solo, total) = solo_run(&spec, &dir.path().join("solo"));
    let shared = dir.path().join("shared");
    let mut kids: Vec<_> = (0..4).map(|_| spawn_run(&spec, &shared)).collect();
    // Kill -9 the run that is computing a step (its staging directory names its pid).
    let pids: Vec<u32> = kids.iter().map(|k| k.id()).collect();
    let mut victim = None;
    for _ in 0..400 {
        if let Ok(rd) = std::fs::read_dir(shared.join("tmp")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').nth(3).and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid.filter(|p| pids.contains(p)) {
                    victim = Some(pid);
                }
            }
        }
        if victim.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let victim = victim.expect("some run was computing a step");
    let i = pids.iter().position(|&p| p == victim).unwrap();
    kids[i].kill().unwrap(); // SIGKILL
    let mut computed = 0;
    for (j, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        if j == i {
            assert!(!out.status.success());
            continue;
        }
        assert!(out.status.success(), "{}", stderr(&out));
        let s = String::from_utf8(out.stdout).unwrap();
        assert_eq!(csv_of(&s), csv_of(&solo));
        computed += ran(&s);
    }
    // What the killed run published before it died, by its manifests' pid.
    let by_victim = objects(&shared)
        .iter()
        .filter(|o| {
            let m = std::fs::read_to_string(o.join("manifest.json")).unwrap();
            m.contains(&format!("\"pid\": {victim},"))
        })
        .count();
    assert_eq!(
        computed + by_victim,
        total,
        "every step computed exactly once (the killed step's lock was released and a survivor computed it)"
    );
    assert_eq!(objects(&shared).len(), total);
    // The store is complete and intact; the killed run's staging is swept.
    let (again, _) = solo_run(&spec, &shared);
    assert_eq!(ran(&again), 0);
    assert_eq!(std::fs::read_dir(shared.join("tmp")).unwrap().count(), 0);
    ok(&["verify", "--store", shared.to_str().unwrap()]);
}

#[test]
fn a_panicking_step_fails_alone_and_the_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let s = store.to_str().unwrap();
    let out = cmd(&["run", "--scale", "smoke", "--store", s])
        .env("IEU_INJECT_FAULT", "panic:stage1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("step 'stage1 f_p synthetic/badnets-white") && err.contains("panicked"),
        "{err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
    assert!(
        err.contains(
            "not run, because a step they depend on failed: finetune synthetic/badnets-white/ieu"
        ),
        "{err}"
    );
    // Independent steps finished (both no-defence cells); nothing of IEU was published.
    let ls = ok(&["ls", "--store", s]);
    assert_eq!(
        ls.lines().filter(|l| l.starts_with("evaluate ")).count(),
        2,
        "{ls}"
    );
    assert!(!ls.contains("stage1") && !ls.contains("/ieu"), "{ls}");
    // Without the fault, the same command computes only what is missing.
    let again = ok(&["run", "--scale", "smoke", "--store", s]);
    assert_eq!(ran(&again), 6, "{again}");

    // An error (not a panic) in one poison step leaves the other attack's cells complete.
    let store2 = dir.path().join("s2");
    let out = cmd(&[
        "run",
        "--scale",
        "smoke",
        "--store",
        store2.to_str().unwrap(),
        "--jobs",
        "1",
    ])
    .env("IEU_INJECT_FAULT", "error:poison synthetic/blended")
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("step 'poison synthetic/blended'"), "{err}");
    let ls = ok(&["ls", "--store", store2.to_str().unwrap()]);
    assert_eq!(
        ls.lines().filter(|l| l.starts_with("evaluate ")).count(),
        2,
        "{ls}"
    );
    assert!(!ls.contains("blended"), "{ls}");
}

#[test]
fn nonsense_settings_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = dir.path().join("spec.yaml");
    let default = std::fs::read_to_string(root.join("experiments/default.yaml")).unwrap();
    std::fs::write(&spec, &default).unwrap();
    let scales = std::fs::read_to_string(root.join("experiments/scales.yaml")).unwrap();
    let cases = [
        ("dim: 32", "dim: 0", "smoke.model.dim"),
        ("mlp_ratio: 2 }", "mlp_ratio: 0 }", "smoke.model.mlp_ratio"),
        (
            "finetune: { epochs: 15,",
            "finetune: { epochs: 0,",
            "smoke.finetune.epochs",
        ),
        (
            "pretrain: { view: flip, epochs: 60,",
            "pretrain: { view: flip, epochs: 0,",
            "smoke.pretrain.epochs",
        ),
        (
            "stage1: { epochs: 15, lr: 5.0e-3, warmup_epochs: 1 }",
            "stage1: { epochs: 15, lr: 5.0e-3, warmup_epochs: 16 }",
            "smoke.stage1.warmup_epochs",
        ),
        ("test: 320 }", "test: 0 }", "smoke.data.test"),
        ("tune: 1280,", "tune: 0,", "smoke.data.tune"),
        ("image_size: 32", "image_size: 2048", "smoke.image_size"),
        ("batch_size: 32", "batch_size: 0", "smoke.batch_size"),
    ];
    let store = dir.path().join("store");
    for (from, to, field) in cases {
        let smoke_end = scales.find("\ncpu:").unwrap();
        let (smoke, rest) = scales.split_at(smoke_end);
        assert!(smoke.contains(from), "{from}");
        std::fs::write(
            dir.path().join("scales.yaml"),
            format!("{}{rest}", smoke.replacen(from, to, 1)),
        )
        .unwrap();
        let out = run(&[
            "run",
            spec.to_str().unwrap(),
            "--scale",
            "smoke",
            "--store",
            store.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{to}");
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("scales.yaml") && err.contains(&format!("`{field}`")),
            "{to}: {err}"
        );
        assert!(objects(&store).is_empty(), "no work started for {to}");
    }
    std::fs::remove_file(dir.path().join("scales.yaml")).unwrap();
    // An attack target the dataset does not have: refused when planning (also --dry-run).
    std::fs::write(&spec, default.replacen("  target: 1", "  target: 99", 1)).unwrap();
    assert!(
        std::fs::read_to_string(&spec)
            .unwrap()
            .contains("target: 99")
    );
    let out = run(&[
        "run",
        spec.to_str().unwrap(),
        "--scale",
        "smoke",
        "--store",
        store.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("spec.yaml")
            && err.contains("`defaults.target`")
            && err.contains("10 classes"),
        "{err}"
    );
}

#[test]
fn small_mistakes_end_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // A mistyped store is not created by commands that only read.
    let typo = dir.path().join("artefacts-typo");
    for args in [
        vec![
            "report",
            "--scale",
            "smoke",
            "--store",
            typo.to_str().unwrap(),
        ],
        vec!["ls", "--store", typo.to_str().unwrap()],
        vec!["verify", "--store", typo.to_str().unwrap()],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("no store at"), "{}", stderr(&out));
        assert!(!typo.exists());
    }
    // bench with no timed steps.
    let out = run(&["bench", "--scale", "smoke", "--steps", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--steps 0"), "{}", stderr(&out));
    // Output cut short by a closed pipe: no panic.
    let mut child = cmd(&[
        "run",
        "--scale",
        "smoke",
        "--store",
        dir.path().join("p").to_str().unwrap(),
        "--dry-run",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    // report --out into a directory that does not exist: an error, no file.
    let store = dir.path().join("s");
    ok(&[
        "run",
        "--scale",
        "smoke",
        "--store",
        store.to_str().unwrap(),
    ]);
    let bad = dir.path().join("missing/r.md");
    let out = run(&[
        "report",
        "--scale",
        "smoke",
        "--store",
        store.to_str().unwrap(),
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("r.md"), "{}", stderr(&out));
    // logits on an empty batch: an error naming the shape, not a crash.
    let pre = object_of_kind(&store, "pretrain");
    let key = pre.file_name().unwrap().to_string_lossy().into_owned();
    let vit = dir.path().join("vit.safetensors");
    ok(&[
        "export",
        &key,
        "--out",
        vit.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ]);
    let x = dir.path().join("x.npy");
    ieu_bench::models::logits::write_npy(&x, &[0, 3, 16, 16], &[]).unwrap();
    let out = run(&[
        "logits",
        vit.to_str().unwrap(),
        "--input",
        x.to_str().unwrap(),
        "--heads",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("B ≥ 1"), "{}", stderr(&out));
}
