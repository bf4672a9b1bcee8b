//! Sharing by hash through the binary: push and pull over a directory remote and over a
//! real S3-compatible server (moto, started here on loopback), damage on the remote,
//! resumed pushes, bundles, garbage collection and report provenance.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;
use common::{cmd, err_of, ok, ok_cmd, out};

fn objects(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("objects"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn reports(store: &str) -> (String, String) {
    (
        ok(&["report", "--scale", "smoke", "--store", store]),
        ok(&[
            "report", "--scale", "smoke", "--store", store, "--format", "csv",
        ]),
    )
}

/// A store with the default spec computed at smoke scale.
fn computed_store(dir: &Path) -> PathBuf {
    let a = dir.join("a");
    ok(&["run", "--scale", "smoke", "--store", a.to_str().unwrap()]);
    a
}

#[test]
fn push_and_pull_through_a_directory_remote() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let (sa, remote) = (a.to_str().unwrap(), dir.path().join("remote"));
    ok(&[
        "remote",
        "add",
        "origin",
        remote.to_str().unwrap(),
        "--store",
        sa,
    ]);
    assert!(ok(&["remote", "list", "--store", sa]).contains("origin\tfile://"));
    let pushed = ok(&["push", "--scale", "smoke", "--store", sa]);
    assert!(pushed.contains("pushed 14 objects"), "{pushed}");
    let again = ok(&["push", "--scale", "smoke", "--store", sa]);
    assert!(
        again.contains("pushed 0 objects") && again.contains("14 already there"),
        "{again}"
    );

    // B pulls by URL, with nothing configured.
    let b = dir.path().join("b");
    let sb = b.to_str().unwrap();
    let url = format!("file://{}", remote.display());
    let pulled = ok(&["pull", &url, "--scale", "smoke", "--store", sb]);
    assert!(pulled.contains("pulled 14 objects"), "{pulled}");
    assert_eq!(reports(sb), reports(sa), "B renders the same report");
    let plan = ok(&["run", "--scale", "smoke", "--store", sb, "--dry-run"]);
    assert!(plan.contains("0 to run"), "{plan}");

    // A hash (prefix) pulls that step's closure only.
    let c = dir.path().join("c");
    let csv = reports(sa).1;
    let ieu_row = csv.lines().find(|l| l.contains(",ieu,")).unwrap();
    let key = ieu_row.rsplit(',').next().unwrap();
    let pulled = ok(&["pull", &url, &key[..10], "--store", c.to_str().unwrap()]);
    // evaluate <- finetune(ieu) <- stage1, poison, pretrain <- dataset
    assert!(pulled.contains("pulled 6 objects"), "{pulled}");

    // `run --pull` computes only what nobody pushed.
    let d = dir.path().join("d");
    let o = out(cmd(&[
        "run",
        "--scale",
        "smoke",
        "--store",
        d.to_str().unwrap(),
        "--pull",
        &url,
    ])
    .env("RUST_LOG", "warn"));
    assert!(o.status.success(), "{}", err_of(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("done: 14 steps, 0 run, 14 cached"), "{s}");
}

#[test]
fn damaged_remote_objects_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let sa = a.to_str().unwrap();
    let remote = dir.path().join("remote");
    let url = format!("file://{}", remote.display());
    ok(&["push", &url, "--scale", "smoke", "--store", sa]);
    // Flip one byte of the pretrained model on the remote.
    let ls = ok(&["ls", "--store", sa, "--kind", "pretrain"]);
    let short = ls
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let pkey = objects(&a)
        .into_iter()
        .find(|k| k.starts_with(&short))
        .unwrap();
    let file = remote.join("objects").join(&pkey).join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();

    let b = dir.path().join("b");
    let o = out(&mut cmd(&[
        "pull",
        &url,
        "--scale",
        "smoke",
        "--store",
        b.to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(1));
    let err = err_of(&o);
    assert!(
        err.contains(&format!("refused pretrain synthetic ({pkey})"))
            && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(
        err.contains("not published, because they were computed from a refused object"),
        "{err}"
    );
    // Kept: what does not depend on the pretrained model (the dataset and the two poison
    // steps); nothing built on the damaged model was published.
    let kept = objects(&b);
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(!kept.contains(&pkey));
    let ls = ok(&["ls", "--store", b.to_str().unwrap()]);
    assert!(!ls.contains("finetune") && !ls.contains("stage1"), "{ls}");
    // Repaired on the remote: the rest of the closure arrives.
    std::fs::write(&file, {
        bytes[mid] ^= 0x40;
        &bytes
    })
    .unwrap();
    let ok_now = ok(&[
        "pull",
        &url,
        "--scale",
        "smoke",
        "--store",
        b.to_str().unwrap(),
    ]);
    assert!(ok_now.contains("pulled 11 objects"), "{ok_now}");
}

#[test]
fn an_interrupted_push_resumes_with_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let sa = a.to_str().unwrap();
    let remote = dir.path().join("remote");
    let url = format!("file://{}", remote.display());
    // A real SIGKILL early in a push…
    let mut child = cmd(&["push", &url, "--scale", "smoke", "--store", sa])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let _ = child.kill();
    let _ = child.wait();
    // …and, deterministically, what such a kill leaves: objects whose files arrived but not
    // their manifest, and one with only some of its files.
    ok(&["push", &url, "--scale", "smoke", "--store", sa]);
    let keys = objects(&remote);
    assert_eq!(keys.len(), 14);
    for k in &keys[..3] {
        std::fs::remove_file(remote.join("objects").join(k).join("manifest.json")).unwrap();
    }
    let first_file = std::fs::read_dir(remote.join("objects").join(&keys[3]))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.ends_with("manifest.json"))
        .unwrap();
    std::fs::remove_file(remote.join("objects").join(&keys[3]).join("manifest.json")).unwrap();
    std::fs::remove_file(first_file).unwrap();
    let again = ok(&["push", &url, "--scale", "smoke", "--store", sa]);
    assert!(
        again.contains("pushed 4 objects") && again.contains("10 already there"),
        "{again}"
    );
    let b = dir.path().join("b");
    ok(&[
        "pull",
        &url,
        "--scale",
        "smoke",
        "--store",
        b.to_str().unwrap(),
    ]);
    assert_eq!(reports(b.to_str().unwrap()), reports(sa));
}

#[test]
fn bundles_round_trip_and_truncated_ones_import_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let sa = a.to_str().unwrap();
    let file = dir.path().join("results.tar.zst");
    let wrote = ok(&[
        "bundle",
        "--scale",
        "smoke",
        "--store",
        sa,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(wrote.contains("14 objects"), "{wrote}");
    let c = dir.path().join("c");
    let sc = c.to_str().unwrap();
    let imported = ok(&["unbundle", file.to_str().unwrap(), "--store", sc]);
    assert!(imported.contains("imported 14 objects"), "{imported}");
    assert_eq!(reports(sc), reports(sa));
    assert!(ok(&["run", "--scale", "smoke", "--store", sc, "--dry-run"]).contains("0 to run"));

    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.tar.zst");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let d = dir.path().join("d");
    let o = out(&mut cmd(&[
        "unbundle",
        cut.to_str().unwrap(),
        "--store",
        d.to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(1));
    let err = err_of(&o);
    assert!(
        err.contains("cut.tar.zst") && err.contains("nothing was imported"),
        "{err}"
    );
    assert!(objects(&d).is_empty());
    assert_eq!(std::fs::read_dir(d.join("tmp")).unwrap().count(), 0);
}

#[test]
fn gc_lists_exactly_what_no_kept_spec_needs() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let sa = a.to_str().unwrap();
    let default_objects = objects(&a);
    // Another spec's steps in the same store: the default grid with one more attack.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = std::fs::read_to_string(root.join("experiments/default.yaml")).unwrap();
    let other = dir.path().join("other.yaml");
    let grid = spec
        .lines()
        .find(|l| l.trim_start().starts_with("attack:"))
        .unwrap();
    std::fs::write(&other, spec.replacen(grid, "  attack: [sig]", 1)).unwrap();
    ok(&[
        "run",
        other.to_str().unwrap(),
        "--scale",
        "smoke",
        "--store",
        sa,
    ]);
    let all = objects(&a);
    let extra: Vec<&String> = all
        .iter()
        .filter(|k| !default_objects.contains(k))
        .collect();
    assert!(!extra.is_empty());

    let keep = root.join("experiments/default.yaml");
    let listed = ok(&[
        "gc",
        "--dry-run",
        "--keep",
        keep.to_str().unwrap(),
        "--store",
        sa,
    ]);
    let would: Vec<&str> = listed
        .lines()
        .filter(|l| l.starts_with("would remove ") && !l.contains(" objects ("))
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(would.len(), extra.len(), "{listed}");
    for k in &extra {
        assert!(would.contains(&&k[..12]), "{k} not listed: {listed}");
    }
    assert_eq!(objects(&a), all, "a dry run removes nothing");
    // Kept with another seed only, the default's own (seed 0) steps are not protected;
    // with both seeds they are.
    let gc_seeds = |seeds: &str| {
        ok(&[
            "gc",
            "--dry-run",
            "--keep",
            keep.to_str().unwrap(),
            "--seed",
            seeds,
            "--store",
            sa,
        ])
    };
    let other_seed = gc_seeds("7");
    for k in &default_objects {
        assert!(other_seed.contains(&k[..12]), "{k} kept: {other_seed}");
    }
    assert_eq!(gc_seeds("0,7").lines().count(), listed.lines().count());
    ok(&[
        "gc",
        "--delete",
        "--keep",
        keep.to_str().unwrap(),
        "--store",
        sa,
    ]);
    assert_eq!(objects(&a), default_objects);
    assert!(ok(&["run", "--scale", "smoke", "--store", sa, "--dry-run"]).contains("0 to run"));
}

#[test]
fn reports_name_the_keys_of_their_cells() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let (md, csv) = reports(a.to_str().unwrap());
    for row in csv.lines().skip(1) {
        let key = row.rsplit(',').next().unwrap();
        assert!(
            md.contains(&format!("`{key}`")),
            "{key} not in the markdown"
        );
    }
    assert!(md.contains("Provenance: backend"), "{md}");
}

#[test]
fn remote_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let sa = a.to_str().unwrap();
    let o = out(&mut cmd(&[
        "remote",
        "add",
        "x",
        "http://example.org/b",
        "--store",
        sa,
    ]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err_of(&o).contains("use s3://BUCKET/PREFIX"),
        "{}",
        err_of(&o)
    );
    let o = out(&mut cmd(&["push", "s3://", "--store", sa]));
    assert_eq!(o.status.code(), Some(1));
    let o = out(
        cmd(&["push", "s3://bucket/p", "--scale", "smoke", "--store", sa])
            .env_remove("AWS_ACCESS_KEY_ID"),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err_of(&o).contains("s3://bucket/p") && err_of(&o).contains("no credentials"),
        "{}",
        err_of(&o)
    );
    let missing = dir.path().join("nowhere");
    let o = out(&mut cmd(&[
        "pull",
        &format!("file://{}", missing.display()),
        "--scale",
        "smoke",
        "--store",
        dir.path().join("b").to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(1));
    assert!(err_of(&o).contains("does not exist"), "{}", err_of(&o));
    let o = out(&mut cmd(&["push", "--store", sa]));
    assert_eq!(o.status.code(), Some(1));
    assert!(err_of(&o).contains("which remote?"), "{}", err_of(&o));
}

/// A moto S3 server on a free loopback port, stopped when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Option<Moto> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let args = ["-H", "127.0.0.1", "-p", port_s.as_str()];
    let spawn = |program: &str, pre: &[&str]| {
        Command::new(program)
            .args(pre)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    };
    let child = spawn("moto_server", &[]).or_else(|| {
        let has_module = Command::new("python3")
            .args(["-c", "import moto.server"])
            .output()
            .is_ok_and(|o| o.status.success());
        if has_module {
            spawn("python3", &["-m", "moto.server"])
        } else {
            None
        }
    })?;
    let moto = Moto { child, port };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(moto);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// Creates a bucket with one unsigned `PUT /bucket` (moto accepts it).
fn create_bucket(port: u16, bucket: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

fn s3(c: &mut Command, port: u16) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
}

#[test]
fn push_and_pull_through_a_real_s3_server() {
    let Some(moto) = start_moto() else {
        eprintln!(
            "\n*** NOT RUN: push_and_pull_through_a_real_s3_server needs `moto_server` \
             (pip install 'moto[server]'; .ci/run installs it) ***\n"
        );
        return;
    };
    create_bucket(moto.port, "ieu");
    let dir = tempfile::tempdir().unwrap();
    let a = computed_store(dir.path());
    let sa = a.to_str().unwrap();
    ok_cmd(s3(
        &mut cmd(&["remote", "add", "lab", "s3://ieu/bench/v1", "--store", sa]),
        moto.port,
    ));
    let pushed = ok_cmd(s3(
        &mut cmd(&["push", "--scale", "smoke", "--store", sa]),
        moto.port,
    ));
    assert!(pushed.contains("pushed 14 objects"), "{pushed}");
    let again = ok_cmd(s3(
        &mut cmd(&["push", "lab", "--scale", "smoke", "--store", sa]),
        moto.port,
    ));
    assert!(again.contains("14 already there"), "{again}");

    let b = dir.path().join("b");
    let sb = b.to_str().unwrap();
    let pulled = ok_cmd(s3(
        &mut cmd(&[
            "pull",
            "s3://ieu/bench/v1",
            "--scale",
            "smoke",
            "--store",
            sb,
        ]),
        moto.port,
    ));
    assert!(pulled.contains("pulled 14 objects"), "{pulled}");
    assert_eq!(reports(sb), reports(sa));
    assert!(ok(&["run", "--scale", "smoke", "--store", sb, "--dry-run"]).contains("0 to run"));

    // A bucket that does not exist: one clear error naming it.
    let o = out(s3(
        &mut cmd(&[
            "push",
            "s3://no-such-bucket/x",
            "--scale",
            "smoke",
            "--store",
            sa,
        ]),
        moto.port,
    ));
    assert_eq!(o.status.code(), Some(1));
    let err = err_of(&o);
    assert!(
        err.contains("s3://no-such-bucket/x") && err.contains("bucket does not exist"),
        "{err}"
    );
}
