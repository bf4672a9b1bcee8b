use super::*;

fn manifest(key: &str) -> Manifest {
    Manifest {
        key: key.into(),
        kind: "test".into(),
        label: "t".into(),
        code_identity: "test".into(),
        code: "c".into(),
        dependencies: String::new(),
        tool_version: "0".into(),
        params: serde_json::json!({}),
        inputs: BTreeMap::new(),
        outputs: BTreeMap::new(),
        duration_s: 0.0,
        backend: "none".into(),
        host: host_name(),
        pid: std::process::id(),
        created: "now".into(),
    }
}

fn publish(store: &Store, key: &str, files: &[(&str, &[u8])]) {
    let lock = store.try_lock(key).unwrap().unwrap();
    let st = store.stage(&lock).unwrap();
    for (name, bytes) in files {
        fs::write(st.path().join(name), bytes).unwrap();
    }
    store.publish(st, manifest(key)).unwrap();
}

#[test]
fn unpublished_staging_is_invisible_and_publish_is_complete() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let key = "ab".repeat(32);
    let lock = store.try_lock(&key).unwrap().unwrap();
    let st = store.stage(&lock).unwrap();
    fs::write(st.path().join("a.txt"), b"hello").unwrap();
    assert!(!store.contains(&key), "a staged step must not be visible");
    drop(st); // a failed step: staging vanishes, nothing published
    assert!(!store.contains(&key));

    let st = store.stage(&lock).unwrap();
    fs::write(st.path().join("a.txt"), b"hello").unwrap();
    let m = store.publish(st, manifest(&key)).unwrap();
    assert!(store.contains(&key));
    assert_eq!(m.outputs["a.txt"].bytes, 5);
    assert_eq!(
        m.outputs["a.txt"].blake3,
        blake3::hash(b"hello").to_hex().to_string()
    );
    store.verify(&key).unwrap();
    assert_eq!(store.resolve(&key[..6]).unwrap(), key);
}

#[test]
fn tampered_object_is_quarantined_with_both_digests() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let key = "cd".repeat(32);
    publish(&store, &key, &[("metrics.json", br#"{"ca": 10.625}"#)]);
    let good = blake3::hash(br#"{"ca": 10.625}"#).to_hex().to_string();
    // A fresh store handle and a fresh verification (not the publish-time memo).
    forget_verified(&store.object_dir(&key));
    fs::write(
        store.object_dir(&key).join("metrics.json"),
        br#"{"ca": 90.625}"#,
    )
    .unwrap();
    let bad = blake3::hash(br#"{"ca": 90.625}"#).to_hex().to_string();
    let err = store.verified(&key).unwrap_err();
    assert!(err.downcast_ref::<Damaged>().is_some());
    let msg = format!("{err:#}");
    assert!(msg.contains(&key) && msg.contains("metrics.json"), "{msg}");
    assert!(msg.contains(&good) && msg.contains(&bad), "{msg}");
    assert!(!store.contains(&key), "a damaged object leaves objects/");
    let q: Vec<_> = fs::read_dir(root.path().join("quarantine"))
        .unwrap()
        .collect();
    assert_eq!(q.len(), 1);
    // A missing output file is damage too.
    let key2 = "ef".repeat(32);
    publish(&store, &key2, &[("model.safetensors", b"weights")]);
    fs::remove_file(store.object_dir(&key2).join("model.safetensors")).unwrap();
    assert!(store.verify(&key2).is_err());
    assert!(!store.contains(&key2));
}

#[test]
fn verified_hashes_an_object_once_per_process() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let key = "12".repeat(32);
    publish(&store, &key, &[("x", b"1")]);
    forget_verified(&store.object_dir(&key));
    store.verified(&key).unwrap();
    // Once verified, the memo answers (a later change is found by `verify`).
    fs::write(store.object_dir(&key).join("x"), b"2").unwrap();
    store.verified(&key).unwrap();
    assert!(store.verify(&key).is_err());
}

#[test]
fn a_key_lock_excludes_others_until_dropped() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let key = "34".repeat(32);
    let held = store.try_lock(&key).unwrap().expect("free lock");
    // flock locks belong to open file descriptions: a second open is excluded even
    // within one process, as another process would be.
    assert!(store.try_lock(&key).unwrap().is_none());
    drop(held);
    assert!(store.try_lock(&key).unwrap().is_some());
}

#[test]
fn sweep_removes_staging_without_a_live_owner_only() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let live_key = "56".repeat(32);
    let lock = store.try_lock(&live_key).unwrap().unwrap();
    let live = store.stage(&lock).unwrap();
    fs::write(live.path().join("x"), b"1").unwrap();
    let tmp = root.path().join("tmp");
    // A run that died (any host): its key's lock is free.
    let dead = tmp.join(format!("stage-{}-otherhost-1-abc", "78".repeat(32)));
    // Pre-lock naming: judged by pid on this host only.
    let host = host_name();
    let legacy_dead = tmp.join(format!("stage-{host}-999999999-abc"));
    let other_host = tmp.join("stage-elsewhere-999999999-abc");
    for d in [&dead, &legacy_dead, &other_host] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("model.safetensors"), b"half").unwrap();
    }
    let removed = store.sweep_stale().unwrap();
    assert!(!dead.exists(), "a staging whose lock is free is stale");
    assert!(live.path().join("x").exists(), "a locked staging stays");
    assert!(other_host.exists(), "another host's legacy staging stays");
    if host != "unknown" && Path::new("/proc/self").exists() {
        assert_eq!(removed, 2);
        assert!(!legacy_dead.exists());
    }
}

#[test]
fn resolve_rejects_bad_and_missing_hashes() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    assert!(
        store
            .resolve("zz")
            .unwrap_err()
            .to_string()
            .contains("not a step hash")
    );
    assert!(
        store
            .resolve("abcd")
            .unwrap_err()
            .to_string()
            .contains("no artefact")
    );
    let missing = root.path().join("typo");
    assert!(Store::open_existing(&missing).is_err());
    assert!(
        !missing.exists(),
        "a read-only command never creates a store"
    );
}

#[test]
fn atomic_write_leaves_the_old_file_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.md");
    write_atomic(&path, b"old").unwrap();
    let err = write_atomic_with(&path, |_| Err(anyhow!("disk full")));
    assert!(err.is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old");
    let leftovers = fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary file is left behind");
}
