//! Remotes: other places that hold store objects, by key — a directory (a shared
//! filesystem, NFS, a mounted bucket) or an S3-compatible bucket — through the
//! `object_store` crate.
//!
//! Layout on a remote, as in a local store: `objects/<key>/<file>` for every output file and
//! `objects/<key>/manifest.json`. An object is on the remote if and only if its manifest is:
//! a push uploads every file first and the manifest last, each as one atomic PUT (or
//! multipart upload completed in one request), so a reader never sees a manifest whose
//! files are not all there, and a push killed half-way leaves at most files without a
//! manifest, which the next push sends again. Everything pulled is verified against its
//! manifest before it is published locally.
//!
//! Configured remotes live in `<store>/remotes.json` (`ieu-bench remote add NAME URL`);
//! `IEU_REMOTE` (a name or a URL) chooses one without configuring it. S3 endpoint, region
//! and credentials come from the standard `AWS_*` variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for MinIO, Ceph, R2, …,
//! `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use object_store::path::Path as OsPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;

use super::OutputDigest;

const CONFIG: &str = "remotes.json";

/// The remotes configured for a store: name -> URL.
pub fn configured(store_root: &Path) -> Result<BTreeMap<String, String>> {
    let path = store_root.join(CONFIG);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("corrupt {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save(store_root: &Path, remotes: &BTreeMap<String, String>) -> Result<()> {
    super::write_atomic(
        &store_root.join(CONFIG),
        serde_json::to_string_pretty(remotes)?.as_bytes(),
    )
}

/// Adds (or replaces) a remote after checking its URL parses.
pub fn add(store_root: &Path, name: &str, url: &str) -> Result<String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!("remote name '{name}': use letters, digits, '-', '_' or '.'");
    }
    let url = normalise_url(url)?;
    let mut all = configured(store_root)?;
    all.insert(name.to_string(), url.clone());
    save(store_root, &all)?;
    Ok(url)
}

pub fn remove(store_root: &Path, name: &str) -> Result<()> {
    let mut all = configured(store_root)?;
    if all.remove(name).is_none() {
        bail!("no remote named '{name}' (remotes: {})", names(&all));
    }
    save(store_root, &all)
}

fn names(all: &BTreeMap<String, String>) -> String {
    if all.is_empty() {
        "none; add one with `ieu-bench remote add NAME URL`".into()
    } else {
        all.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Whether a command-line word names a remote (rather than a spec or a hash).
pub fn is_remote_word(store_root: &Path, word: &str) -> bool {
    word.starts_with("s3://")
        || word.starts_with("file://")
        || configured(store_root).is_ok_and(|r| r.contains_key(word))
}

/// Chooses the remote: `name` (a configured name or a URL), else `IEU_REMOTE`, else the
/// only configured remote, else `origin`.
pub fn choose(store_root: &Path, name: Option<&str>) -> Result<(String, String)> {
    let all = configured(store_root)?;
    let env = std::env::var("IEU_REMOTE").ok().filter(|s| !s.is_empty());
    let word = match name.map(str::to_string).or(env) {
        Some(w) => w,
        None if all.len() == 1 => all.keys().next().unwrap().clone(),
        None if all.contains_key("origin") => "origin".into(),
        None => bail!(
            "which remote? name one (configured: {}) or set IEU_REMOTE",
            names(&all)
        ),
    };
    if let Some(url) = all.get(&word) {
        return Ok((word, url.clone()));
    }
    if word.contains("://") {
        let url = normalise_url(&word)?;
        return Ok((url.clone(), url));
    }
    bail!("no remote named '{word}' (remotes: {})", names(&all))
}

/// `s3://bucket[/prefix]`, `file:///abs/dir`, or a directory path (made absolute).
fn normalise_url(url: &str) -> Result<String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or("");
        if bucket.is_empty() {
            bail!("remote URL '{url}': no bucket (write s3://BUCKET/PREFIX)");
        }
        return Ok(url.trim_end_matches('/').to_string());
    }
    if url.contains("://") && !url.starts_with("file://") {
        bail!("remote URL '{url}': use s3://BUCKET/PREFIX, file:///DIR or a directory path");
    }
    let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    if path.as_os_str().is_empty() {
        bail!("remote URL '{url}': empty path");
    }
    let abs = std::path::absolute(&path).unwrap_or(path);
    Ok(format!("file://{}", abs.display()))
}

/// An open remote.
pub struct Remote {
    pub name: String,
    pub url: String,
    os: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl Remote {
    /// Opens a remote. `create` makes a directory remote's directory if it is missing.
    pub fn open(name: &str, url: &str, create: bool) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the I/O runtime")?;
        let at = || format!("remote {name} ({url})");
        let os: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let has_key = std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
            let anonymous = std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v == "true");
            if !has_key && !anonymous {
                bail!(
                    "{}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
                     AWS_ENDPOINT, AWS_REGION for a service other than AWS S3), or \
                     AWS_SKIP_SIGNATURE=true for a public bucket",
                    at()
                );
            }
            // (These replace the client options `from_env` read, so carry AWS_ALLOW_HTTP.)
            let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
            let options = object_store::ClientOptions::new()
                .with_allow_http(allow_http)
                .with_timeout(Duration::from_secs(60))
                .with_connect_timeout(Duration::from_secs(5));
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            };
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(options)
                .with_retry(retry)
                .build()
                .map_err(|e| anyhow!("{}: {e}", at()))?;
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            }
        } else {
            let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            if !dir.is_dir() {
                if create {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("{}: cannot create {}", at(), dir.display()))?;
                } else {
                    bail!("{}: directory {} does not exist", at(), dir.display());
                }
            }
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| anyhow!("{}: {e}", at()))?,
            )
        };
        let remote = Self {
            name: name.to_string(),
            url: url.to_string(),
            os,
            rt,
        };
        remote.check()?;
        Ok(remote)
    }

    /// One listing request: fails with a clear error when the bucket does not exist, the
    /// credentials are refused or the endpoint cannot be reached.
    fn check(&self) -> Result<()> {
        self.rt.block_on(async {
            match self
                .os
                .list_with_delimiter(Some(&OsPath::from("objects")))
                .await
            {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err("listing objects/", e)),
            }
        })
    }

    fn at(&self) -> String {
        if self.name == self.url {
            format!("remote {}", self.url)
        } else {
            format!("remote {} ({})", self.name, self.url)
        }
    }

    fn err(&self, what: &str, e: object_store::Error) -> anyhow::Error {
        let full = e.to_string();
        // S3 error bodies are XML documents: keep their code and message.
        let text = match (full.find("<Code>"), full.find("<Message>")) {
            (Some(c), Some(m)) => {
                let tag = |at: usize, open: &str, close: &str| {
                    let rest = &full[at + open.len()..];
                    rest[..rest.find(close).unwrap_or(rest.len())].to_string()
                };
                let head = full[..full.find('<').unwrap_or(0)].trim_end().to_string();
                format!(
                    "{head} {}: {}",
                    tag(c, "<Code>", "</Code>"),
                    tag(m, "<Message>", "</Message>")
                )
            }
            _ => full.clone(),
        };
        let hint = if full.contains("NoSuchBucket") {
            ": the bucket does not exist (create it, or fix the URL)"
        } else if full.contains("InvalidAccessKeyId") || full.contains("SignatureDoesNotMatch") {
            ": the credentials were refused (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        } else {
            ""
        };
        anyhow!("{}: {what}: {text}{hint}", self.at())
    }

    fn path(key: &str, file: &str) -> OsPath {
        OsPath::from(format!("objects/{key}/{file}"))
    }

    /// The manifest of `key` on the remote (raw bytes), if the remote has the object.
    pub fn manifest_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let p = Self::path(key, super::MANIFEST);
        self.rt.block_on(async {
            match self.os.get(&p).await {
                Ok(r) => Ok(Some(
                    r.bytes()
                        .await
                        .map_err(|e| self.err(&format!("reading {p}"), e))?
                        .to_vec(),
                )),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(&format!("reading {p}"), e)),
            }
        })
    }

    /// Whether the remote holds `key` (its manifest is there).
    pub fn has(&self, key: &str) -> Result<bool> {
        let p = Self::path(key, super::MANIFEST);
        self.rt.block_on(async {
            match self.os.head(&p).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err(&format!("checking {p}"), e)),
            }
        })
    }

    /// Keys on the remote that start with `prefix`.
    pub fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        self.rt.block_on(async {
            let listing = self
                .os
                .list_with_delimiter(Some(&OsPath::from("objects")))
                .await;
            let listing = match listing {
                Ok(l) => l,
                Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(self.err("listing objects/", e)),
            };
            Ok(listing
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_string))
                .filter(|k| k.starts_with(prefix))
                .collect())
        })
    }

    /// Uploads one local file as `objects/<key>/<name>` (multipart for large files).
    pub fn put_file(&self, key: &str, name: &str, local: &Path) -> Result<()> {
        let p = Self::path(key, name);
        self.rt.block_on(async {
            let mut f = tokio::fs::File::open(local)
                .await
                .with_context(|| format!("cannot read {}", local.display()))?;
            let mut w = object_store::buffered::BufWriter::new(self.os.clone(), p.clone());
            tokio::io::copy(&mut f, &mut w)
                .await
                .map_err(|e| anyhow!("{}: uploading {p}: {e}", self.at()))?;
            w.shutdown()
                .await
                .map_err(|e| anyhow!("{}: uploading {p}: {e}", self.at()))?;
            Ok(())
        })
    }

    /// Uploads bytes as `objects/<key>/<name>` in one request.
    pub fn put_bytes(&self, key: &str, name: &str, bytes: Vec<u8>) -> Result<()> {
        let p = Self::path(key, name);
        self.rt.block_on(async {
            self.os
                .put(&p, PutPayload::from(bytes))
                .await
                .map_err(|e| self.err(&format!("uploading {p}"), e))?;
            Ok(())
        })
    }

    /// Downloads `objects/<key>/<name>` into `dest`, hashing it on the way.
    pub fn get_file(&self, key: &str, name: &str, dest: &Path) -> Result<OutputDigest> {
        let p = Self::path(key, name);
        self.rt.block_on(async {
            let r = self
                .os
                .get(&p)
                .await
                .map_err(|e| self.err(&format!("downloading {p}"), e))?;
            let mut stream = r.into_stream();
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = std::fs::File::create(dest)
                .with_context(|| format!("cannot write {}", dest.display()))?;
            let mut h = blake3::Hasher::new();
            let mut bytes = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.err(&format!("downloading {p}"), e))?;
                h.update(&chunk);
                bytes += chunk.len() as u64;
                f.write_all(&chunk)?;
            }
            f.sync_all()?;
            Ok(OutputDigest {
                blake3: h.finalize().to_hex().to_string(),
                bytes,
            })
        })
    }

    /// `remote NAME (URL)`, for messages.
    pub fn describe(&self) -> String {
        self.at()
    }
}
