//! Code identity of every step kind, computed from the source at build time; the analysis
//! is `build/code_identity.rs` (also compiled by `tests/code_identity.rs`), which explains
//! the rules. Writes `$OUT_DIR/code_identity.rs` (the digests, included by `src/dag`) and
//! `$OUT_DIR/code_identity_items.tsv` (every item of every identity and why it is there).

include!("build/code_identity.rs");

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=Cargo.lock");
    // The numeric crates' features are read from the manifest (`numeric_dependencies`).
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=patches");
    println!("cargo:rerun-if-changed=build.rs");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let (ids, deps, debug) = identities(&root);
    let mut out = String::new();
    out.push_str("/// Step identity -> blake3 of the code that computes it, and its item count.\n");
    out.push_str("pub const IDENTITIES: &[(&str, &str, usize)] = &[\n");
    for (name, digest, n) in &ids {
        out.push_str(&format!("    ({name:?}, {digest:?}, {n}),\n"));
    }
    out.push_str("];\n");
    out.push_str(&format!(
        "/// Locked versions of the crates that do the arithmetic.\npub const NUMERIC_DEPENDENCIES: &str = {deps:?};\n"
    ));
    let dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(dir.join("code_identity.rs"), out).unwrap();
    std::fs::write(dir.join("code_identity_items.tsv"), debug).unwrap();
}
