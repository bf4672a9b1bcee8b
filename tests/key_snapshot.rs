//! What every shipped spec asks to compute, pinned: the structural key (kind, parameters
//! and the DAG's shape, not the code) of every step of every spec in `experiments/` at
//! every scale, with the grid's datasets replaced by the generated one (so no data is
//! needed; the paper scale's "all test images" becomes 1000 generated ones). A refactor that keeps this test green changes no step's parameters or inputs;
//! one that moves a line here changes what some step computes, on purpose or not.
//!
//! After an intended change: `IEU_UPDATE_SNAPSHOTS=1 cargo test --test key_snapshot`, and
//! commit `tests/snapshots/structural_keys.txt` with the change.

use std::path::Path;

use ieu_bench::spec::LoadedSpec;

fn snapshot() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut specs: Vec<_> = std::fs::read_dir(root.join("experiments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().unwrap() != "scales.yaml")
        .collect();
    specs.sort();
    let mut out = String::new();
    for path in specs {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut spec = LoadedSpec::from_str(&text, &name, root.join("experiments")).unwrap();
        spec.spec.grid.dataset = vec!["synthetic".into()];
        for scale_name in spec.scale_names().unwrap() {
            let mut scale = spec.scale(&scale_name).unwrap();
            // "All test images" means nothing for generated data: the paper scale's `test: 0`
            // becomes 1000 here (its other sizes are kept).
            if scale.data.test == 0 {
                scale.data.test = 1000;
            }
            match ieu_bench::spec::plan::plan(&spec, &scale, None) {
                Ok(plan) => {
                    let keys = plan.structural_keys();
                    for s in &plan.steps {
                        out.push_str(&format!(
                            "{name} {scale_name} {} {}\n",
                            &keys[&s.key][..16],
                            s.label
                        ));
                    }
                }
                Err(e) => {
                    let first = format!("{e:#}").replace(&root.display().to_string(), "<root>");
                    let first = first.lines().next().unwrap_or("");
                    out.push_str(&format!("{name} {scale_name} not planned: {first}\n"));
                }
            }
        }
    }
    out
}

#[test]
fn every_shipped_spec_plans_the_steps_it_planned_before() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/structural_keys.txt");
    let now = snapshot();
    if std::env::var_os("IEU_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &now).unwrap();
        return;
    }
    let pinned = std::fs::read_to_string(&path).expect("tests/snapshots/structural_keys.txt");
    if pinned != now {
        let old: std::collections::BTreeSet<&str> = pinned.lines().collect();
        let new: std::collections::BTreeSet<&str> = now.lines().collect();
        let gone: Vec<&&str> = old.difference(&new).take(20).collect();
        let added: Vec<&&str> = new.difference(&old).take(20).collect();
        panic!(
            "the shipped specs now plan other steps.\nno longer planned:\n  {}\nnewly planned:\n  {}\n\
             If intended: IEU_UPDATE_SNAPSHOTS=1 cargo test --test key_snapshot",
            gone.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
            added
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
}
