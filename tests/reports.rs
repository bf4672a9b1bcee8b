//! Regression gates and report formats through the binary: `check` against a CSV, a store
//! and the paper's values (exit codes, JUnit), `report --compare`, LaTeX (well-formed, and
//! compiled when `pdflatex` is installed), HTML, and the confidence figures.

use std::path::{Path, PathBuf};

mod common;
use common::{cmd, err_of, ok, out};

/// The default spec with reference values for its synthetic cells and a figure, in `dir`.
fn spec_with_extras(dir: &Path) -> PathBuf {
    let mut spec = default_spec();
    let report_at = spec.find("\nreport:").unwrap();
    spec.truncate(report_at);
    // The figure's line at the default's own gate threshold for the synthetic set.
    let c_thresh = gate_threshold(&spec);
    spec.push_str(
        &r#"
report:
  rows: [dataset, attack]
  columns: defence
  metrics: [asr, ca]
  average: true
  best: { asr: min, ca: max }
  reference:
    source: "made-up reference values"
    cells:
      synthetic/badnets-white/none: { asr: 50.0, ca: 10.0 }
      synthetic/badnets-white/ieu: { asr: 0.5, ca: 99.0 }
figures:
  - name: conf
    title: "max σ(f_p(x)) CDF"
    c_thresh: C_THRESH
    panels:
      - { dataset: synthetic, attack: badnets-white, defence: ieu }
      - { dataset: synthetic, attack: blended, defence: ieu, title: "Blended & friends" }
"#
        .replace("C_THRESH", &c_thresh),
    );
    let path = dir.join("spec.yaml");
    std::fs::write(&path, spec).unwrap();
    path
}

fn default_spec() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join("experiments/default.yaml")).unwrap()
}

/// The synthetic set's IEU threshold in the default spec's `per_dataset` entry, as written.
fn gate_threshold(default_spec: &str) -> String {
    let spec: serde_yaml_ng::Value = serde_yaml_ng::from_str(default_spec).unwrap();
    let c = &spec["per_dataset"]["synthetic"]["ieu"]["c_thresh"];
    c.as_f64()
        .map(|v| v.to_string())
        .expect("experiments/default.yaml sets the synthetic threshold in per_dataset")
}

fn check(args: &[&str]) -> (Option<i32>, String, String) {
    let o = out(&mut cmd(args));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        err_of(&o),
    )
}

#[test]
fn check_gates_on_a_csv_a_store_and_the_paper() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras(dir.path());
    let (sp, store) = (spec.to_str().unwrap(), dir.path().join("s"));
    let s = store.to_str().unwrap();
    ok(&["run", sp, "--scale", "smoke", "--store", s]);
    let csv = ok(&[
        "report", sp, "--scale", "smoke", "--store", s, "--format", "csv",
    ]);
    let base = dir.path().join("base.csv");
    std::fs::write(&base, &csv).unwrap();
    let b = base.to_str().unwrap();
    let common = ["check", sp, "--scale", "smoke", "--store", s];

    let (code, stdout, _) = check(&[&common[..], &["--baseline", b]].concat());
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("0 regressed") && stdout.contains("0 missing"),
        "{stdout}"
    );

    // The baseline's ASR of one cell 5 points lower: now looks 5 points worse.
    let mut lines: Vec<String> = csv.lines().map(String::from).collect();
    let i = lines
        .iter()
        .position(|l| l.contains(",blended,ieu,"))
        .unwrap();
    let mut f: Vec<String> = lines[i].split(',').map(String::from).collect();
    let asr: f64 = f[3].parse().unwrap();
    f[3] = format!("{:.2}", asr - 5.0);
    lines[i] = f.join(",");
    std::fs::write(&base, lines.join("\n") + "\n").unwrap();
    let junit = dir.path().join("junit.xml");
    let (code, stdout, stderr) = check(
        &[
            &common[..],
            &["--baseline", b, "--junit", junit.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("synthetic/blended/ieu") && stdout.contains("REGRESSED"),
        "{stdout}"
    );
    assert!(stderr.contains("synthetic/blended/ieu asr"), "{stderr}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("failures=\"1\"") && xml.contains("<failure"),
        "{xml}"
    );
    // A looser tolerance for that cell lets it pass.
    let (code, ..) = check(
        &[
            &common[..],
            &[
                "--baseline",
                b,
                "--tol",
                "asr=1,ca=1",
                "--tol",
                "*/blended/ieu:asr=6",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, Some(0));
    // Improvements are reported, not failures.
    f[3] = format!("{:.2}", asr + 5.0);
    lines[i] = f.join(",");
    std::fs::write(&base, lines.join("\n") + "\n").unwrap();
    let (code, stdout, _) = check(&[&common[..], &["--baseline", b]].concat());
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("improved"), "{stdout}");

    // A row deleted from the baseline: incomplete, exit 2.
    lines.remove(i);
    std::fs::write(&base, lines.join("\n") + "\n").unwrap();
    let (code, stdout, _) = check(&[&common[..], &["--baseline", b]].concat());
    assert_eq!(code, Some(2), "{stdout}");
    assert!(stdout.contains("MISSING"), "{stdout}");
    // An unreadable baseline: exit 2.
    let (code, _, stderr) = check(&[&common[..], &["--baseline", "nope.csv"]].concat());
    assert_eq!(code, Some(2), "{stderr}");

    // Against the paper: only cells with reference values are compared.
    let (code, stdout, _) = check(
        &[
            &common[..],
            &["--baseline", "paper", "--tol", "asr=100,ca=100"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) = check(&[&common[..], &["--baseline", "paper"]].concat());
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("synthetic/badnets-white/ieu"), "{stdout}");

    // Against another store that holds the same results: nothing moved.
    let other = dir.path().join("s2");
    ok(&[
        "run",
        sp,
        "--scale",
        "smoke",
        "--store",
        other.to_str().unwrap(),
    ]);
    let (code, stdout, _) =
        check(&[&common[..], &["--baseline-store", other.to_str().unwrap()]].concat());
    assert_eq!(code, Some(0), "{stdout}");
}

#[test]
fn formats_share_one_table_with_ranks_deltas_and_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras(dir.path());
    let (sp, store) = (spec.to_str().unwrap(), dir.path().join("s"));
    let s = store.to_str().unwrap();
    ok(&["run", sp, "--scale", "smoke", "--store", s]);
    let csv = ok(&[
        "report", sp, "--scale", "smoke", "--store", s, "--format", "csv",
    ]);
    let base = dir.path().join("base.csv");
    let mut lines: Vec<String> = csv.lines().map(String::from).collect();
    let mut f: Vec<String> = lines[1].split(',').map(String::from).collect();
    let ca: f64 = f[4].parse().unwrap();
    f[4] = format!("{:.2}", ca - 1.25);
    lines[1] = f.join(",");
    std::fs::write(&base, lines.join("\n") + "\n").unwrap();

    let md = ok(&[
        "report",
        sp,
        "--scale",
        "smoke",
        "--store",
        s,
        "--compare",
        base.to_str().unwrap(),
    ]);
    assert!(md.contains("Δ+1.25"), "{md}");
    assert!(md.contains("Δ±0.00"), "{md}");
    assert!(
        md.contains("(50.00)"),
        "reference values in parentheses: {md}"
    );

    let tex = ok(&[
        "report", sp, "--scale", "smoke", "--store", s, "--format", "latex",
    ]);
    for needle in [
        "\\begin{tabular}",
        "\\toprule",
        "\\midrule",
        "\\bottomrule",
        "\\multicolumn",
        "\\caption{",
        "\\textit{Average}",
    ] {
        assert!(tex.contains(needle), "{needle} missing:\n{tex}");
    }
    // Balanced braces, and the same numbers as the CSV.
    let depth = tex.chars().try_fold(0i32, |d, c| {
        let d = d + (c == '{') as i32 - (c == '}') as i32;
        (d >= 0).then_some(d)
    });
    assert_eq!(depth, Some(0), "unbalanced braces:\n{tex}");
    for row in csv.lines().skip(1) {
        let f: Vec<&str> = row.split(',').collect();
        assert!(
            tex.contains(f[3]) && tex.contains(f[4]),
            "{row} not in\n{tex}"
        );
    }
    // Markdown and LaTeX mark the same cells best and second best.
    let md_best = md.matches("**").count() / 2;
    let tex_best = tex.matches("\\textbf{").count();
    assert_eq!(md_best, tex_best, "{md}\n{tex}");
    assert_eq!(
        md.matches("<u>").count(),
        tex.matches("\\underline{").count()
    );
    compile_latex(&tex, dir.path());

    let html_path = dir.path().join("r.html");
    ok(&[
        "report",
        sp,
        "--scale",
        "smoke",
        "--store",
        s,
        "--format",
        "html",
        "--out",
        html_path.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<table class=\"results\">"));
    assert!(html.contains("class=\"best\""), "bold cells");
    assert!(html.contains("<svg"), "the confidence figure is inlined");
    assert!(
        html.contains("data:image/png;base64,"),
        "the trigger grid is embedded"
    );
    assert!(html.contains("Blended &amp; friends"), "text is escaped");
    for row in csv.lines().skip(1) {
        let key = row.rsplit(',').next().unwrap();
        assert!(html.contains(key), "provenance lists {key}");
    }
}

fn compile_latex(table: &str, dir: &Path) {
    let Ok(status) = std::process::Command::new("pdflatex")
        .arg("--version")
        .output()
    else {
        eprintln!(
            "\n*** NOT RUN: compiling the LaTeX table needs pdflatex (apt-get install texlive-latex-recommended) ***\n"
        );
        return;
    };
    assert!(status.status.success());
    std::fs::write(dir.join("table.tex"), table).unwrap();
    std::fs::write(
        dir.join("doc.tex"),
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n\\begin{document}\n\\input{table.tex}\n\\end{document}\n",
    )
    .unwrap();
    let o = std::process::Command::new("pdflatex")
        .args(["-interaction=nonstopmode", "-halt-on-error", "doc.tex"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pdflatex failed:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(dir.join("doc.pdf").is_file());
}

#[test]
fn figures_agree_with_the_gate_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras(dir.path());
    let (sp, store) = (spec.to_str().unwrap(), dir.path().join("s"));
    let s = store.to_str().unwrap();
    ok(&["run", sp, "--scale", "smoke", "--store", s]);
    let figs = dir.path().join("figs");
    let o = out(&mut cmd(&[
        "report",
        sp,
        "--scale",
        "smoke",
        "--store",
        s,
        "--figures",
        figs.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", err_of(&o));
    let png = std::fs::read(figs.join("conf.png")).unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (960, 420));
    let svg = std::fs::read_to_string(figs.join("conf.svg")).unwrap();
    // The percentages below c_thresh in the figure are 100 − the gate's flagged shares
    // (the figure's line is at the default spec's synthetic gate threshold).
    let csv = ok(&[
        "report", sp, "--scale", "smoke", "--store", s, "--format", "csv",
    ]);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    // The figure's shares (one decimal) against the CSV's (two decimals, themselves
    // rounded): equal within the two roundings.
    let shown: Vec<f64> = svg
        .split(&format!("% ≤ {}", gate_threshold(&default_spec())))
        .filter_map(|before| {
            let tail = before.rsplit(|c: char| !(c.is_ascii_digit() || c == '.'));
            tail.into_iter().next().and_then(|n| n.parse().ok())
        })
        .collect();
    assert!(!shown.is_empty(), "no share below c_thresh in the figure");
    for row in csv.lines().skip(1).filter(|r| r.contains(",ieu,")) {
        let f: Vec<&str> = row.split(',').collect();
        for name in ["poison_flagged", "clean_flagged"] {
            let below = 100.0 - f[col(name)].parse::<f64>().unwrap();
            assert!(
                shown.iter().any(|x| (x - below).abs() <= 0.056),
                "{name}: {below:.2} not in the figure's {shown:?}"
            );
        }
    }
}
