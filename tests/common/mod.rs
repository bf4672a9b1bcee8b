//! Helpers shared by the integration tests that drive the `ieu-bench` binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ieu-bench"))
}

/// The binary with `args`, none of the user's ieu-bench environment, warnings only.
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(exe());
    c.args(args)
        .env_remove("IEU_STORE")
        .env_remove("IEU_DATA_DIR")
        .env_remove("IEU_REMOTE")
        .env_remove("IEU_INJECT_FAULT")
        .env("RUST_LOG", "warn");
    c
}

pub fn out(c: &mut Command) -> Output {
    c.output().unwrap()
}

/// Runs `c`, asserts success, returns its stdout.
pub fn ok_cmd(c: &mut Command) -> String {
    let o = out(c);
    assert!(
        o.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub fn ok(args: &[&str]) -> String {
    ok_cmd(&mut cmd(args))
}

pub fn err_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
