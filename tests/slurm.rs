//! `run --executor slurm` on a real one-node Slurm cluster (`scripts/slurm-local.sh`
//! brings it up; `.ci/run` calls it). Where the cluster cannot be started, the tests say
//! so loudly and do not pretend to pass anything.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

mod common;
use common::{cmd, err_of, ok, out};

/// The tests share one cluster; they run one at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-local.sh");
    let o = Command::new("bash").arg(&script).output();
    match o {
        Ok(o) if o.status.success() => Some(guard),
        Ok(o) => {
            eprintln!(
                "\n*** NOT RUN: no Slurm cluster (scripts/slurm-local.sh failed):\n{}\n***\n",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("\n*** NOT RUN: cannot run scripts/slurm-local.sh: {e} ***\n");
            None
        }
    }
}

fn slurm_run(store: &Path, extra: &[&str]) -> Command {
    let mut c = cmd(&[
        &[
            "run",
            "--scale",
            "smoke",
            "--store",
            store.to_str().unwrap(),
            "--executor",
            "slurm",
        ][..],
        extra,
    ]
    .concat());
    c.env("RUST_LOG", "info");
    c
}

fn squeue_ids() -> Vec<String> {
    let o = Command::new("squeue")
        .args(["-h", "-o", "%i"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn wait_for_empty_queue() {
    for _ in 0..600 {
        if squeue_ids().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("the Slurm queue did not drain");
}

#[test]
fn a_spec_runs_on_slurm_and_reports_as_a_local_run() {
    let Some(_c) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (s, l) = (dir.path().join("slurm"), dir.path().join("local"));
    let o = out(&mut slurm_run(&s, &["--wait"]));
    assert!(o.status.success(), "{}", err_of(&o));
    let err = err_of(&o);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(stdout.contains("slurm: submitted 14 jobs"), "{stdout}");
    assert!(
        err.contains("slurm: 14 done, 0 running, 0 pending, 0 failed"),
        "{err}"
    );
    ok(&["run", "--scale", "smoke", "--store", l.to_str().unwrap()]);
    for fmt in ["markdown", "csv"] {
        let a = ok(&[
            "report",
            "--scale",
            "smoke",
            "--store",
            s.to_str().unwrap(),
            "--format",
            fmt,
        ]);
        let b = ok(&[
            "report",
            "--scale",
            "smoke",
            "--store",
            l.to_str().unwrap(),
            "--format",
            fmt,
        ]);
        assert_eq!(a, b, "{fmt} report");
    }
    // Every job logged to <store>/logs/<key>.out.
    assert_eq!(std::fs::read_dir(s.join("logs")).unwrap().count(), 14);
    let status = ok(&["status", "--scale", "smoke", "--store", s.to_str().unwrap()]);
    assert!(
        status.starts_with("14 done, 0 running, 0 pending, 0 failed"),
        "{status}"
    );
}

#[test]
fn a_failed_step_is_named_its_dependents_never_run_and_a_rerun_submits_the_rest() {
    let Some(_c) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let o =
        out(slurm_run(&s, &["--wait"])
            .env("IEU_INJECT_FAULT", "error:stage1 f_p synthetic/blended"));
    assert_eq!(o.status.code(), Some(1));
    let err = err_of(&o);
    assert!(
        err.contains("step 'stage1 f_p synthetic/blended") && err.contains("/logs/"),
        "{err}"
    );
    assert!(
        err.contains("not run, because a step they depend on failed: finetune synthetic/blended/ieu, evaluate synthetic/blended/ieu"),
        "{err}"
    );
    let log = err
        .split("log: ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim();
    assert!(
        std::fs::read_to_string(log)
            .unwrap()
            .contains("injected fault")
    );
    let ls = ok(&["ls", "--store", s.to_str().unwrap()]);
    assert!(
        !ls.contains("blended/ieu") && !ls.contains("stage1 f_p synthetic/blended"),
        "{ls}"
    );
    // Fixed: the same command submits only the three missing steps.
    let o = out(&mut slurm_run(&s, &["--wait"]));
    assert!(o.status.success(), "{}", err_of(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(
        stdout.contains(
            "slurm: submitted 3 jobs, 0 already queued or running, 11 steps already stored"
        ),
        "{stdout}"
    );
}

#[test]
fn submitting_twice_while_pending_submits_each_step_once() {
    let Some(_c) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    // Held back for a minute, so every job is still pending at the second submission.
    let hold = ["--sbatch-arg=--begin=now+60"];
    let first = ok_cmd_out(&mut slurm_run(&s, &hold));
    assert!(first.contains("submitted 14 jobs"), "{first}");
    let second = ok_cmd_out(&mut slurm_run(&s, &hold));
    assert!(
        second.contains("submitted 0 jobs, 14 already queued or running"),
        "{second}"
    );
    let status = ok(&["status", "--scale", "smoke", "--store", s.to_str().unwrap()]);
    assert!(
        status.starts_with("0 done, 0 running, 14 pending"),
        "{status}"
    );
    let ids = squeue_ids();
    assert_eq!(ids.len(), 14, "{ids:?}");
    Command::new("scancel").args(&ids).status().unwrap();
    wait_for_empty_queue();
}

fn ok_cmd_out(c: &mut Command) -> String {
    common::ok_cmd(c)
}

#[test]
fn a_cancelled_running_job_is_recomputed_and_leaves_nothing_partial() {
    let Some(_c) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    ok_cmd_out(&mut slurm_run(&s, &[]));
    // Cancel the first job seen running (the dataset or the pretrain).
    let mut cancelled = None;
    for _ in 0..300 {
        let o = Command::new("squeue")
            .args(["-h", "-t", "RUNNING", "-o", "%i"])
            .output()
            .unwrap();
        if let Some(id) = String::from_utf8_lossy(&o.stdout).lines().next() {
            cancelled = Some(id.trim().to_string());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let id = cancelled.expect("a job ran");
    Command::new("scancel").arg(&id).status().unwrap();
    wait_for_empty_queue();
    let o = out(&mut slurm_run(&s, &["--wait"]));
    assert!(o.status.success(), "{}", err_of(&o));
    ok(&["verify", "--store", s.to_str().unwrap()]);
    assert_eq!(std::fs::read_dir(s.join("objects")).unwrap().count(), 14);
    assert_eq!(
        std::fs::read_dir(s.join("tmp")).unwrap().count(),
        0,
        "the cancelled job's staging directory is swept"
    );
}
