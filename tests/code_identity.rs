//! Keys follow the code: the code-identity analysis of `build.rs`, run on edited copies of
//! this crate's source. Each case edits one line and checks exactly which step identities
//! move (and so which stored steps would be recomputed).

include!("../build/code_identity.rs");

use std::collections::BTreeMap;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of `src/`, `patches/`, `Cargo.lock` and `Cargo.toml` in a temporary directory.
fn copy_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let trees = walkdir::WalkDir::new(root().join("src"))
        .into_iter()
        .chain(walkdir::WalkDir::new(root().join("patches")));
    for entry in trees {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(root()).unwrap();
        let dst = dir.path().join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
        } else {
            std::fs::copy(entry.path(), &dst).unwrap();
        }
    }
    std::fs::copy(root().join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
    std::fs::copy(root().join("Cargo.toml"), dir.path().join("Cargo.toml")).unwrap();
    dir
}

fn ids(at: &Path) -> BTreeMap<String, String> {
    identities(at)
        .0
        .into_iter()
        .map(|(n, d, _)| (n, d))
        .collect()
}

/// Replaces `from` (which must occur in `file`) and returns the identities that changed.
fn changed_by(edits: &[(&str, &str, &str)]) -> Vec<String> {
    let base = ids(&root());
    let tree = copy_tree();
    for (file, from, to) in edits {
        let path = tree.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} no longer contains {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
    let now = ids(tree.path());
    base.iter()
        .filter(|(n, d)| now.get(*n) != Some(*d))
        .map(|(n, _)| n.clone())
        .collect()
}

#[test]
fn the_built_identities_are_this_analysis_of_this_source() {
    let here = ids(&root());
    for (name, digest, _) in ieu_bench::dag::code::IDENTITIES {
        assert_eq!(here.get(*name).map(String::as_str), Some(*digest), "{name}");
    }
}

#[test]
fn an_edit_to_eq3_moves_only_the_ieu_finetune() {
    let moved = changed_by(&[(
        "src/defences/ieu.rs",
        "(6.0 - inner.exp()).max(0.2)",
        "(6.5 - inner.exp()).max(0.2)",
    )]);
    assert_eq!(moved, ["finetune/ieu"]);
}

#[test]
fn an_edit_to_logit_masking_moves_only_the_ieu_finetune() {
    let moved = changed_by(&[(
        "src/defences/ieu.rs",
        "pub fn masked_logits_with(",
        "pub fn masked_logits_with_renamed(",
    )]);
    // A rename that breaks the caller is still an edit of reachable code.
    assert_eq!(moved, ["finetune/ieu"]);
}

#[test]
fn comments_docs_formatting_and_tests_move_nothing() {
    let moved = changed_by(&[
        (
            "src/defences/ieu.rs",
            "pub fn dynamic_unlearn_scale(",
            "// a comment\n/// more doc\npub   fn\n   dynamic_unlearn_scale(",
        ),
        (
            "src/train/fit.rs",
            "        let mut sum = 0.0;",
            "        // note\n\n        let mut sum = 0.0;   ",
        ),
        (
            "src/models/vit.rs",
            "    pub fn forward(&self, x: Tensor<3>)",
            "    /// Doc.\n    pub fn forward(&self, x: Tensor<3>)",
        ),
        (
            "src/store/tests.rs",
            "fn a_key_lock_excludes_others_until_dropped() {",
            "fn a_key_lock_excludes_others_until_dropped() {\n    let _unused_in_a_test = 1;",
        ),
    ]);
    assert!(moved.is_empty(), "moved: {moved:?}");
}

#[test]
fn the_training_loop_moves_what_trains_with_it_and_not_data_or_poison() {
    let moved = changed_by(&[(
        "src/train/fit.rs",
        "factor: 1.0 - lr * wd,",
        "factor: 1.0 - 0.5 * lr * wd,",
    )]);
    for must in ["pretrain", "stage1", "finetune/none", "isolate"] {
        assert!(moved.contains(&must.to_string()), "{must} not in {moved:?}");
    }
    for never in ["dataset", "poison/", "evaluate", "import"] {
        assert!(
            !moved.iter().any(|m| m == never || m.starts_with(never)),
            "{never} in {moved:?}"
        );
    }
}

#[test]
fn the_vit_moves_every_model_step_and_the_synthetic_generator_every_step() {
    let vit = changed_by(&[(
        "src/models/vit.rs",
        "        let hd = d / self.heads;",
        "        let hd = d / self.heads + 0;",
    )]);
    assert!(!vit.contains(&"dataset".to_string()), "{vit:?}");
    // Fixed-trigger attacks do not run a model; CAT's poison step trains an f_p.
    for never in ["poison/badnets", "poison/blended"] {
        assert!(!vit.contains(&never.to_string()), "{never} in {vit:?}");
    }
    for must in [
        "poison/cat",
        "pretrain",
        "stage1",
        "finetune/ieu",
        "finetune/none",
        "evaluate",
    ] {
        assert!(vit.contains(&must.to_string()), "{must} not in {vit:?}");
    }
    let data = changed_by(&[(
        "src/data/synthetic.rs",
        "let (img, label) = render(seed, 1, i as u64, size);",
        "let (img, label) = render(seed, 2, i as u64, size);",
    )]);
    assert_eq!(data, ["dataset/synthetic"]);
}

#[test]
fn each_dataset_format_moves_only_its_own_steps() {
    let names: Vec<String> = ids(&root()).into_keys().collect();
    let formats: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("dataset/"))
        .collect();
    assert_eq!(
        formats,
        [
            "dataset/cifar10",
            "dataset/gtsrb",
            "dataset/imagefolder",
            "dataset/synthetic",
            "dataset/tinyimagenet"
        ]
    );
    // The common split moves every format.
    let moved = changed_by(&[(
        "src/data/mod.rs",
        "let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ 0xDA7A);",
        "let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ 0xDA7B);",
    )]);
    assert_eq!(moved, formats);
    // CIFAR-10's reader moves CIFAR-10's steps only.
    let moved = changed_by(&[(
        "src/data/cifar10.rs",
        "pub fn load(dir: &Path) -> Result<RawSplits> {",
        "pub fn load(dir: &Path) -> Result<RawSplits> {\n    let _ = 1 + 1;",
    )]);
    assert_eq!(moved, ["dataset/cifar10"]);
}

#[test]
fn new_items_elsewhere_move_nothing() {
    // Items added to unrelated modules (before and after everything else) must not shift
    // anything that enters a digest.
    let moved = changed_by(&[
        (
            "src/lib.rs",
            "pub mod attacks;",
            "pub mod attacks;\nthread_local! { static X: u8 = const { 0 }; }",
        ),
        (
            "src/cli/mod.rs",
            "fn human_bytes(b: u64) -> String {",
            "fn unrelated_helper() {}\nfn human_bytes(b: u64) -> String {",
        ),
    ]);
    // A new item-level macro call is in every identity (it has no name to be reached by).
    assert_eq!(moved.len(), ids(&root()).len(), "{moved:?}");
    let moved = changed_by(&[(
        "src/cli/mod.rs",
        "fn human_bytes(b: u64) -> String {",
        "fn unrelated_helper() {}\nmacro_rules! unrelated { () => {}; }\nfn human_bytes(b: u64) -> String {",
    )]);
    assert!(moved.is_empty(), "moved: {moved:?}");
}

#[test]
fn each_registered_defence_has_its_own_finetune_identity() {
    let names: Vec<String> = ids(&root()).into_keys().collect();
    for d in ["none", "ieu", "abl", "ibau", "fine-pruning"] {
        assert!(names.contains(&format!("finetune/{d}")), "{names:?}");
    }
    // AttnBlock trains nothing: it has no finetune step of its own.
    assert!(
        !names.contains(&"finetune/attnblock".to_string()),
        "{names:?}"
    );
    // An edit inside one defence moves that defence's finetune only.
    let moved = changed_by(&[(
        "src/defences/fine_pruning.rs",
        "if before - a > fp.max_accuracy_drop {",
        "if before - a >= fp.max_accuracy_drop {",
    )]);
    assert_eq!(moved, vec!["finetune/fine-pruning".to_string()]);
}

#[test]
fn the_command_line_and_reports_move_nothing() {
    let moved = changed_by(&[
        (
            "src/cli/mod.rs",
            "fn human_bytes(b: u64) -> String {",
            "fn human_bytes(b: u64) -> String {\n    let _ = 1 + 1;",
        ),
        (
            "src/report/mod.rs",
            "pub fn collect(",
            "pub fn collect_renamed(",
        ),
    ]);
    assert!(moved.is_empty(), "moved: {moved:?}");
}

#[test]
fn a_numeric_feature_moves_everything() {
    let moved = changed_by(&[(
        "Cargo.toml",
        "burn-flex = { version = \"0.22.1\", default-features = false, features = [",
        "burn-flex = { version = \"0.22.1\", default-features = false, features = [\"fft\", ",
    )]);
    assert_eq!(moved.len(), ids(&root()).len(), "{moved:?}");
}

#[test]
fn an_edit_to_a_patched_crate_moves_everything() {
    let moved = changed_by(&[(
        "patches/burn-flex/src/tensor.rs",
        "Bytes::from_elems(alloc::vec![0u128; len / 16])",
        "Bytes::from_elems(alloc::vec![0u128; len / 16 + 0])",
    )]);
    assert_eq!(moved.len(), ids(&root()).len(), "{moved:?}");
}

#[test]
fn notes_beside_a_patched_crate_move_nothing() {
    let moved = changed_by(&[(
        "patches/README.md",
        "# Patched crates",
        "# Patched crates, notes",
    )]);
    assert!(moved.is_empty(), "{moved:?}");
}

#[test]
fn a_dependency_upgrade_moves_everything() {
    let moved = changed_by(&[(
        "Cargo.lock",
        "name = \"burn-tensor\"\nversion = \"",
        "name = \"burn-tensor\"\nversion = \"9",
    )]);
    assert_eq!(moved.len(), ids(&root()).len(), "{moved:?}");
}

#[test]
fn an_edit_to_one_attack_moves_only_its_own_poison_steps() {
    let moved = changed_by(&[(
        "src/attacks/blended.rs",
        "weight: vec![bp.alpha as f32; size * size],",
        "weight: vec![0.5 * bp.alpha as f32; size * size],",
    )]);
    assert_eq!(moved, ["poison/blended"]);
}
