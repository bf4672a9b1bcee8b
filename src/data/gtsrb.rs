//! GTSRB (German Traffic Sign Recognition Benchmark, Stallkamp et al. 2012) in the official
//! layout, 43 classes:
//!
//! ```text
//! DIR/GTSRB/Final_Training/Images/000NN/*.ppm      one folder per class 00000..00042
//! DIR/GTSRB/Final_Training/Images/000NN/GT-000NN.csv
//! DIR/GTSRB/Final_Test/Images/*.ppm
//! GT-final_test.csv                                 (from GTSRB_Final_Test_GT.zip)
//! ```
//!
//! The CSVs are semicolon-separated with a header
//! `Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId`; file names are relative to
//! the CSV's image folder. Only the rows' files are read. The test labels file is looked up
//! in `Final_Test/Images/`, `Final_Test/`, `GTSRB/` and `DIR/` (the official zip unpacks it
//! at its top level). Images are whole frames (the ROI is not cropped, as in torchvision's
//! `GTSRB`), resized to the scale's square size.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::files::{FileSplits, require_dir};

pub const NUM_CLASSES: usize = 43;
pub const TEST_CSV: &str = "GT-final_test.csv";

/// Normalisation: the reference implementation normalises every dataset with the CIFAR-10
/// constants (reference notes §1.2: "CIFAR 10 (but in practice used for all datasets)"),
/// so GTSRB does too. GTSRB's own training-set statistics, often quoted as mean
/// (0.3337, 0.3064, 0.3171), std (0.2672, 0.2564, 0.2629), are not used.
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];

/// The `GTSRB` folder: `DATA_DIR/GTSRB` or `DATA_DIR` itself (holding `Final_Training/`).
pub fn find(data_dir: Option<&Path>) -> Result<PathBuf> {
    let Some(root) = data_dir else {
        bail!(
            "dataset gtsrb needs a data directory: pass --data-dir DIR (or set IEU_DATA_DIR) \
             where DIR/GTSRB/Final_Training/Images/ and DIR/GTSRB/Final_Test/Images/ hold the \
             official GTSRB files"
        );
    };
    for cand in [root.join("GTSRB"), root.to_path_buf()] {
        if cand.join("Final_Training").is_dir() || cand.join("Final_Test").is_dir() {
            require_dir(cand.join("Final_Training/Images"), "GTSRB training images")?;
            require_dir(cand.join("Final_Test/Images"), "GTSRB test images")?;
            return Ok(cand);
        }
    }
    bail!(
        "GTSRB not found: expected {}/GTSRB/Final_Training/Images/000NN/ (43 class folders with \
         GT-000NN.csv) and {}/GTSRB/Final_Test/Images/ with {TEST_CSV}",
        root.display(),
        root.display()
    )
}

/// Rows of a GTSRB label CSV: (file path, class id), with the file checked to exist.
fn read_csv(csv: &Path, image_dir: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let mut lines = text.lines().enumerate();
    let (_, header) = lines
        .next()
        .ok_or_else(|| anyhow!("{} is empty", csv.display()))?;
    let cols: Vec<&str> = header.trim().split(';').collect();
    let col = |name: &str| {
        cols.iter().position(|c| *c == name).ok_or_else(|| {
            anyhow!(
                "{}: the header has no {name} column (header: {})",
                csv.display(),
                header.trim()
            )
        })
    };
    let (fcol, ccol) = (col("Filename")?, col("ClassId")?);
    let mut out = Vec::new();
    for (i, line) in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(';').collect();
        let at = || format!("{} line {}", csv.display(), i + 1);
        if f.len() != cols.len() {
            bail!(
                "{}: {} fields, the header has {}",
                at(),
                f.len(),
                cols.len()
            );
        }
        let class: usize = f[ccol]
            .trim()
            .parse()
            .map_err(|_| anyhow!("{}: ClassId '{}' is not a number", at(), f[ccol]))?;
        if class >= NUM_CLASSES {
            bail!("{}: ClassId {class} is not in 0..{}", at(), NUM_CLASSES - 1);
        }
        let path = image_dir.join(f[fcol].trim());
        if !path.is_file() {
            bail!(
                "{}: image {} does not exist in {}",
                at(),
                f[fcol].trim(),
                image_dir.display()
            );
        }
        out.push((path, class));
    }
    if out.is_empty() {
        bail!("{} lists no images", csv.display());
    }
    Ok(out)
}

/// The test labels file, searched in the usual places.
fn test_csv(dir: &Path) -> Result<PathBuf> {
    let cands = [
        dir.join("Final_Test/Images").join(TEST_CSV),
        dir.join("Final_Test").join(TEST_CSV),
        dir.join(TEST_CSV),
        dir.parent().map(|p| p.join(TEST_CSV)).unwrap_or_default(),
    ];
    if let Some(p) = cands.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let unlabelled = dir.join("Final_Test/Images/GT-final_test.test.csv");
    let hint = if unlabelled.is_file() {
        format!(
            " ({} has no ClassId column: the labels come in GTSRB_Final_Test_GT.zip)",
            unlabelled.display()
        )
    } else {
        String::new()
    };
    bail!(
        "GTSRB test labels not found: looked for {TEST_CSV} in {}{hint}",
        cands
            .iter()
            .filter_map(|p| p.parent())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The samples of the `dataset` step (the root of its code identity, `dataset/gtsrb`).
pub fn source(dir: &Path) -> Result<super::Source> {
    Ok(super::Source::Files(index(dir)?))
}

/// Lists every sample (no image is decoded).
pub fn index(dir: &Path) -> Result<FileSplits> {
    let train_dir = require_dir(dir.join("Final_Training/Images"), "GTSRB training images")?;
    let mut train = Vec::new();
    let mut label_files = Vec::new();
    let mut missing = Vec::new();
    for c in 0..NUM_CLASSES {
        let class_dir = train_dir.join(format!("{c:05}"));
        if !class_dir.is_dir() {
            missing.push(format!("{c:05}"));
            continue;
        }
        let csv = class_dir.join(format!("GT-{c:05}.csv"));
        if !csv.is_file() {
            bail!(
                "GTSRB class folder {} has no {}",
                class_dir.display(),
                csv.file_name().unwrap().to_string_lossy()
            );
        }
        for (path, class) in read_csv(&csv, &class_dir)? {
            if class != c {
                bail!(
                    "{}: {} has ClassId {class} but lies in class folder {c:05}",
                    csv.display(),
                    path.display()
                );
            }
            train.push(super::files::Entry {
                path,
                label: c as u16,
            });
        }
        label_files.push(csv);
    }
    if !missing.is_empty() {
        bail!(
            "GTSRB in {} is incomplete: missing class folders {}",
            train_dir.display(),
            missing.join(", ")
        );
    }
    let test_dir = require_dir(dir.join("Final_Test/Images"), "GTSRB test images")?;
    let csv = test_csv(dir)?;
    let test = read_csv(&csv, &test_dir)?
        .into_iter()
        .map(|(path, c)| super::files::Entry {
            path,
            label: c as u16,
        })
        .collect();
    label_files.push(csv);
    Ok(FileSplits {
        root: dir.to_path_buf(),
        train,
        test,
        classes: (0..NUM_CLASSES).map(|c| format!("{c:05}")).collect(),
        label_files,
        mean: MEAN,
        std: STD,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::data::files::fixture;

    /// Writes an official-layout GTSRB tree under `root`: `per_class` training PPMs per
    /// class (sizes vary) and `test_per_class` test PPMs per class, labels in the CSVs. The
    /// red channel of every image is `(class * 5 + i) % 256`.
    pub fn write_tree(root: &Path, per_class: usize, test_per_class: usize) {
        let base = root.join("GTSRB");
        let header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n";
        let mut test_csv = header.to_string();
        for c in 0..NUM_CLASSES {
            let d = base.join(format!("Final_Training/Images/{c:05}"));
            let mut csv = header.to_string();
            for i in 0..per_class {
                let (w, h) = (6 + (i % 3) as u32, 5 + (i % 2) as u32);
                let name = format!("00000_{i:05}.ppm");
                let img = fixture::rgb(w, h, ((c * 5 + i) % 256) as u8);
                fixture::write(&d.join(&name), &image::DynamicImage::ImageRgb8(img));
                csv.push_str(&format!("{name};{w};{h};1;1;{};{};{c}\n", w - 1, h - 1));
            }
            std::fs::write(d.join(format!("GT-{c:05}.csv")), csv).unwrap();
            for i in 0..test_per_class {
                let name = format!("{:05}.ppm", c * test_per_class + i);
                let img = fixture::rgb(7, 7, ((c * 5 + i) % 256) as u8);
                fixture::write(
                    &base.join("Final_Test/Images").join(&name),
                    &image::DynamicImage::ImageRgb8(img),
                );
                test_csv.push_str(&format!("{name};7;7;1;1;6;6;{c}\n"));
            }
        }
        std::fs::write(base.join("Final_Test/Images").join(TEST_CSV), test_csv).unwrap();
    }

    #[test]
    fn reads_the_official_layout() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path(), 2, 1);
        let root = find(Some(dir.path())).unwrap();
        let idx = index(&root).unwrap();
        assert_eq!(idx.train.len(), 86);
        assert_eq!(idx.test.len(), 43);
        assert_eq!(idx.classes.len(), 43);
        assert_eq!(idx.label_files.len(), 44);
        let raw = idx.load(4).unwrap();
        assert_eq!(raw.train.size, 4);
        assert_eq!(raw.train.labels[..4], [0, 0, 1, 1]);
        // Class 7, image 1: red = 36, constant over the (resized) image.
        let i = 7 * 2 + 1;
        assert_eq!(raw.train.labels[i], 7);
        assert!(raw.train.image(i)[..16].iter().all(|&v| v == 36));
        assert_eq!(raw.test.labels[42], 42);
        assert!(raw.test.image(42)[..16].iter().all(|&v| v == 210));
    }

    #[test]
    fn digest_changes_when_an_image_changes() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path(), 1, 1);
        let root = find(Some(dir.path())).unwrap();
        let a = index(&root).unwrap().digest().unwrap();
        assert_eq!(a, index(&root).unwrap().digest().unwrap());
        let p = root.join("Final_Training/Images/00003/00000_00000.ppm");
        fixture::write(&p, &image::DynamicImage::ImageRgb8(fixture::rgb(6, 5, 99)));
        assert_ne!(a, index(&root).unwrap().digest().unwrap());
    }

    #[test]
    fn errors_name_what_is_wrong_where() {
        let dir = tempfile::tempdir().unwrap();
        let e = find(Some(dir.path())).unwrap_err().to_string();
        assert!(
            e.contains("GTSRB not found") && e.contains("Final_Training"),
            "{e}"
        );
        let e = find(None).unwrap_err().to_string();
        assert!(e.contains("--data-dir"), "{e}");

        write_tree(dir.path(), 1, 1);
        let root = dir.path().join("GTSRB");
        // Test labels next to Final_Test/ instead of in Images/ are found too.
        std::fs::rename(
            root.join("Final_Test/Images").join(TEST_CSV),
            root.join("Final_Test").join(TEST_CSV),
        )
        .unwrap();
        assert_eq!(index(&root).unwrap().test.len(), 43);
        std::fs::remove_file(root.join("Final_Test").join(TEST_CSV)).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(
            e.contains("GTSRB test labels not found") && e.contains("Final_Test"),
            "{e}"
        );
        write_tree(dir.path(), 1, 1);

        // A CSV row naming a missing file.
        std::fs::remove_file(root.join("Final_Training/Images/00005/00000_00000.ppm")).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(
            e.contains("GT-00005.csv line 2") && e.contains("00000_00000.ppm does not exist"),
            "{e}"
        );
        write_tree(dir.path(), 1, 1);

        // A corrupt image: indexing succeeds, decoding names the file.
        std::fs::write(
            root.join("Final_Training/Images/00002/00000_00000.ppm"),
            b"P6 junk",
        )
        .unwrap();
        let e = format!("{:#}", index(&root).unwrap().load(4).err().unwrap());
        assert!(e.contains("00002/00000_00000.ppm"), "{e}");
        write_tree(dir.path(), 1, 1);

        // A wrong class id and a missing class folder.
        let csv = root.join("Final_Training/Images/00001/GT-00001.csv");
        let text = std::fs::read_to_string(&csv)
            .unwrap()
            .replace(";1\n", ";3\n");
        std::fs::write(&csv, text).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(
            e.contains("ClassId 3") && e.contains("class folder 00001"),
            "{e}"
        );
        std::fs::remove_dir_all(root.join("Final_Training/Images/00042")).unwrap();
        std::fs::remove_dir_all(root.join("Final_Training/Images/00001")).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(e.contains("missing class folders 00001, 00042"), "{e}");
    }
}

#[cfg(test)]
mod end_to_end {
    use clap::Parser;

    /// `ieu-bench run experiments/table3.yaml --scale smoke --data-dir DIR --only
    /// dataset=gtsrb ...` on an official-layout fixture: the dataset step subsamples the
    /// sizes of a smoke scale beside the spec copy (320 / 320 / 160) and the rest of the
    /// DAG runs on it.
    #[test]
    fn smoke_run_on_a_fixture_gtsrb_via_data_dir() {
        let data = tempfile::tempdir().unwrap();
        super::tests::write_tree(data.path(), 16, 4); // 688 train, 172 test
        let store = tempfile::tempdir().unwrap();
        let specs = tempfile::tempdir().unwrap();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/table3.yaml"),
            specs.path().join("table3.yaml"),
        )
        .unwrap();
        let scales = crate::spec::DEFAULT_SCALES.replace(
            "data: { pretrain: 1280, tune: 1280, test: 320 }",
            "data: { pretrain: 320, tune: 320, test: 160 }",
        );
        std::fs::write(specs.path().join("scales.yaml"), scales).unwrap();
        let spec_path = specs.path().join("table3.yaml");
        let spec = spec_path.to_str().unwrap();
        let args = |extra: &[&str]| {
            let mut a = vec![
                "ieu-bench",
                "run",
                spec,
                "--scale",
                "smoke",
                "--only",
                "dataset=gtsrb",
                "--only",
                "attack=badnets-white",
                "--only",
                "defence=none",
                "--jobs",
                "1",
                "--data-dir",
                data.path().to_str().unwrap(),
                "--store",
                store.path().to_str().unwrap(),
            ];
            a.extend_from_slice(extra);
            crate::cli::Cli::parse_from(a)
        };
        crate::cli::main(args(&[])).unwrap();
        let mut spec = crate::spec::LoadedSpec::load(Some(std::path::Path::new(spec))).unwrap();
        spec.apply_only(&[
            "dataset=gtsrb".into(),
            "attack=badnets-white".into(),
            "defence=none".into(),
        ])
        .unwrap();
        let scale = spec.scale("smoke").unwrap();
        let plan = crate::spec::plan::plan(&spec, &scale, Some(data.path())).unwrap();
        let st = crate::store::Store::open(store.path()).unwrap();
        assert!(
            plan.steps.iter().all(|s| st.contains(&s.key)),
            "everything ran"
        );
        let ds = plan
            .steps
            .iter()
            .find(|s| s.kind == crate::dag::Kind::Dataset)
            .unwrap();
        let meta = crate::data::load_meta(&st.object_dir(&ds.key)).unwrap();
        assert_eq!((meta.pretrain, meta.tune, meta.test), (320, 320, 160));
        assert_eq!((meta.classes.len(), meta.image_size), (43, 32));
        let tune =
            crate::data::ImageSet::load(&st.object_dir(&ds.key).join("tune.safetensors")).unwrap();
        assert_eq!(tune.size, 32);
        assert!(tune.labels.iter().all(|&l| l < 43));

        // Changing one image changes the dataset key.
        let p = data
            .path()
            .join("GTSRB/Final_Training/Images/00000/00000_00000.ppm");
        crate::data::files::fixture::write(
            &p,
            &image::DynamicImage::ImageRgb8(crate::data::files::fixture::rgb(6, 5, 77)),
        );
        let again = crate::spec::plan::plan(&spec, &scale, Some(data.path())).unwrap();
        assert!(!st.contains(&again.steps[0].key));
    }

    /// A report of table3 with only GTSRB on disk leaves the other datasets out.
    #[test]
    fn reports_leave_out_datasets_whose_files_are_missing() {
        let data = tempfile::tempdir().unwrap();
        super::tests::write_tree(data.path(), 1, 1);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/table3.yaml");
        let mut spec = crate::spec::LoadedSpec::load(Some(std::path::Path::new(path))).unwrap();
        spec.apply_only(&["attack=badnets-white".into()]).unwrap();
        let scale = spec.scale("smoke").unwrap();
        let plan = crate::spec::plan::plan_available(&spec, &scale, Some(data.path())).unwrap();
        assert!(plan.cells.iter().all(|c| c.dataset == "gtsrb"));
        assert_eq!(plan.cells.len(), 4, "none, ibau, abl and ieu");
        for s in ["dataset cifar10", "dataset tinyimagenet"] {
            assert!(plan.skipped.iter().any(|k| k == s), "{:?}", plan.skipped);
        }
    }
}
