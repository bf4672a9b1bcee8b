//! A user's own images in the ImageFolder layout (as torchvision's `ImageFolder`):
//!
//! ```text
//! ROOT/train/<class>/*.{png,jpg,jpeg,ppm}
//! ROOT/test/<class>/*.{png,jpg,jpeg,ppm}
//! ```
//!
//! Classes are the sorted names of the `train/` subfolders; every `test/` subfolder must be
//! one of them (a test class may be missing). Other files are ignored; hidden files and
//! folders (starting with '.') too. Images of any size are resized to the scale's square.
//!
//! A spec names such a dataset in two ways: the grid entry `imagefolder` reads ROOT =
//! `--data-dir`, and a `datasets:` entry (`mydata: { format: imagefolder, path: DIR }`,
//! DIR relative to the spec file) makes `mydata` a grid dataset of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::files::{Entry, FileSplits, images_in, require_dir, sorted_children};

pub const EXTS: &[&str] = &["png", "jpg", "jpeg", "ppm"];

/// Normalisation: the ImageNet statistics (mean (0.485, 0.456, 0.406), std (0.229, 0.224,
/// 0.225); torchvision's reference values for natural images). Computing them from the
/// user's data would make the step depend on a full pass over it; a per-channel shift of
/// the inputs is absorbed by the learned patch embedding in any case.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Checks that `root` has `train/` and `test/` folders; `what` says where the root came from.
pub fn find(root: &Path, what: &str) -> Result<PathBuf> {
    if !root.is_dir() {
        bail!(
            "{what}: {} does not exist (expected ROOT/train/<class>/ and ROOT/test/<class>/ \
             with .png, .jpg, .jpeg or .ppm images)",
            root.display()
        );
    }
    for split in ["train", "test"] {
        if !root.join(split).is_dir() {
            bail!(
                "{what}: {} has no {split}/ folder (expected ROOT/train/<class>/ and \
                 ROOT/test/<class>/ with images)",
                root.display()
            );
        }
    }
    Ok(root.to_path_buf())
}

/// The samples of the `dataset` step (the root of its code identity, `dataset/imagefolder`).
pub fn source(dir: &Path) -> Result<super::Source> {
    Ok(super::Source::Files(index(dir)?))
}

/// Lists every sample (no image is decoded).
pub fn index(root: &Path) -> Result<FileSplits> {
    let train_dir = require_dir(root.join("train"), "ImageFolder training split")?;
    let class_dirs = sorted_children(&train_dir, true)?;
    if class_dirs.len() < 2 {
        bail!(
            "{} has {} class folders; a classification dataset needs at least 2",
            train_dir.display(),
            class_dirs.len()
        );
    }
    if class_dirs.len() > u16::MAX as usize {
        bail!("{}: too many classes", train_dir.display());
    }
    let classes: Vec<String> = class_dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let class_of: BTreeMap<&str, u16> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u16))
        .collect();
    let mut train = Vec::new();
    for (i, d) in class_dirs.iter().enumerate() {
        for path in images_in(d, EXTS)? {
            train.push(Entry {
                path,
                label: i as u16,
            });
        }
    }
    let test_dir = require_dir(root.join("test"), "ImageFolder test split")?;
    let mut test = Vec::new();
    for d in sorted_children(&test_dir, true)? {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let Some(&label) = class_of.get(name.as_str()) else {
            bail!(
                "{}: test class '{name}' has no training folder in {} (training classes: {})",
                d.display(),
                train_dir.display(),
                classes.join(", ")
            );
        };
        for path in images_in(&d, EXTS)? {
            test.push(Entry { path, label });
        }
    }
    if test.is_empty() {
        bail!("{} has no class folders", test_dir.display());
    }
    Ok(FileSplits {
        root: root.to_path_buf(),
        train,
        test,
        classes,
        label_files: Vec::new(),
        mean: MEAN,
        std: STD,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::data::files::fixture;

    /// `ROOT/{train,test}/<class>/`: classes `cat`, `dog`, `emu` with `n` training and `m`
    /// test images each, in PNG, JPEG and PPM; red = 50 · class index + 20.
    pub fn write_tree(root: &Path, n: usize, m: usize) {
        for (c, name) in ["dog", "cat", "emu"].iter().enumerate() {
            let c = match c {
                0 => 1,
                1 => 0,
                _ => 2,
            }; // sorted index
            let v = (50 * c + 20) as u8;
            for (split, count) in [("train", n), ("test", m)] {
                for i in 0..count {
                    let ext = ["png", "jpg", "ppm"][i % 3];
                    let img = image::DynamicImage::ImageRgb8(fixture::rgb(12, 9, v));
                    fixture::write(&root.join(format!("{split}/{name}/{i}.{ext}")), &img);
                }
            }
        }
        std::fs::write(root.join("train/cat/notes.txt"), "ignored").unwrap();
    }

    #[test]
    fn reads_classes_from_sorted_train_folders() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path(), 3, 2);
        let root = find(dir.path(), "test").unwrap();
        let idx = index(&root).unwrap();
        assert_eq!(idx.classes, ["cat", "dog", "emu"]);
        assert_eq!((idx.train.len(), idx.test.len()), (9, 6));
        let raw = idx.load(6).unwrap();
        assert_eq!(raw.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
        for (i, &l) in raw.train.labels.iter().enumerate() {
            let v = 50 * l as u8 + 20;
            assert!(raw.train.image(i)[..36].iter().all(|&r| r.abs_diff(v) < 12));
        }
        // The grid entry `imagefolder` reads the root at --data-dir.
        let (found, d) = crate::data::locate("imagefolder", None, Some(&root), None)
            .unwrap()
            .unwrap();
        assert_eq!(found, root);
        let e = crate::data::locate("imagefolder", None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--data-dir"), "{e}");
        let a = idx.digest().unwrap();
        assert_eq!(a, d);
        fixture::write(
            &root.join("test/emu/0.png"),
            &image::DynamicImage::ImageRgb8(fixture::rgb(12, 9, 3)),
        );
        assert_ne!(a, index(&root).unwrap().digest().unwrap());
    }

    #[test]
    fn a_spec_entry_names_the_root_relative_to_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(&dir.path().join("data/mine"), 4, 2);
        // A scales.yaml beside the spec with smoke sizes this small set can serve.
        let scales = crate::spec::DEFAULT_SCALES.replace(
            "data: { pretrain: 1280, tune: 1280, test: 320 }",
            "data: { pretrain: 6, tune: 6, test: 6 }",
        );
        std::fs::write(dir.path().join("scales.yaml"), scales).unwrap();
        let text = "name: t\ntitle: T\n\
            datasets: { mine: { format: imagefolder, path: data/mine } }\n\
            grid: { dataset: [mine], attack: [badnets-white], defence: [none] }\n\
            report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n";
        let spec =
            crate::spec::LoadedSpec::from_str(text, "t.yaml", dir.path().to_path_buf()).unwrap();
        let scale = spec.scale("smoke").unwrap();
        let plan = crate::spec::plan::plan(&spec, &scale, None).unwrap();
        let step = plan.steps[0].clone();
        assert_eq!(step.kind, crate::dag::Kind::Dataset);
        assert_eq!(step.locators["dataset_root"], dir.path().join("data/mine"));
        let mut only = crate::dag::Plan::default();
        only.add(step.clone());
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        crate::dag::exec::Executor::new(store.clone(), None, 1)
            .run(&only)
            .unwrap();
        let meta = crate::data::load_meta(&store.object_dir(&step.key)).unwrap();
        assert_eq!(meta.classes, ["cat", "dog", "emu"]);
        assert_eq!((meta.pretrain, meta.tune, meta.test), (6, 6, 6));
        assert_eq!((meta.mean, meta.image_size), (MEAN, 32));

        // The step refuses files that changed after planning, by name.
        fixture::write(
            &dir.path().join("data/mine/train/dog/0.png"),
            &image::DynamicImage::ImageRgb8(fixture::rgb(12, 9, 3)),
        );
        let params: crate::data::DatasetParams = serde_json::from_value(step.params).unwrap();
        let root = dir.path().join("data/mine");
        let e = crate::data::run_dataset_step(&params, None, Some(&root), &dir.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dataset mine") && e.contains("changed since planning"),
            "{e}"
        );

        let bad = text.replace("data/mine", "data/theirs");
        let spec =
            crate::spec::LoadedSpec::from_str(&bad, "t.yaml", dir.path().to_path_buf()).unwrap();
        let e = crate::spec::plan::plan(&spec, &scale, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml: field `datasets.mine.path`") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_what_is_wrong_where() {
        let dir = tempfile::tempdir().unwrap();
        let e = find(
            &dir.path().join("nope"),
            "spec.yaml: field `datasets.x.path`",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("datasets.x.path") && e.contains("does not exist"),
            "{e}"
        );
        write_tree(dir.path(), 1, 1);
        std::fs::create_dir_all(dir.path().join("test/yak")).unwrap();
        let e = index(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("test class 'yak'") && e.contains("cat, dog, emu"),
            "{e}"
        );
        std::fs::remove_dir(dir.path().join("test/yak")).unwrap();
        std::fs::create_dir_all(dir.path().join("train/zebra")).unwrap();
        let e = index(dir.path()).unwrap_err().to_string();
        assert!(e.contains("zebra has no images"), "{e}");
    }
}
