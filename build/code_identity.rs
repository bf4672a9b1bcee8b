// Code identity: which source a step's key hashes (included by build.rs and by
// tests/code_identity.rs).
//
// A step's key hashes the *code* that computes it, so a change to that code gives new keys
// and nothing stale is reused, while a comment, a doc comment, formatting or a test never
// invalidates a stored artefact. Every module of the library is parsed with `syn`; each
// item becomes its token stream (comments and whitespace are not tokens; `#[doc]`
// attributes and `#[cfg(test)]` items are removed) and is linked to the items its tokens
// name. The identity of a step kind is the blake3 hash of every item reachable from the
// kind's entry functions (the `roots` of `src/dag/kinds.rs`, each registered defence's
// `run` for `finetune/<defence>`, each attack module's `run` for `poison/<module>`), plus
// the locked versions of the crates that do its arithmetic (Burn, rand, image decoding).
//
// Name resolution errs on the side of linking too much:
// - `a::b::name` resolves in module `a::b` (relative, `crate::`, `super::`, `self::`, or a
//   module imported by `use`), following that module's `use` re-exports and globs; a path
//   into another crate (`std::`, `burn::`) names nothing of ours;
// - `Type::name` and `Self::name` resolve among the type's impls;
// - `.name(…)` resolves to the methods of that name of every type (and trait) that is
//   reachable, iterated to a fixpoint: a value can only exist where code naming its type
//   runs, and that code is reachable;
// - an unqualified name resolves in its own module, then through the module's `use`s;
// - naming a type pulls in its impl headers, and trait impls whole (their methods are
//   called implicitly: `Drop`, `Display`, `From` through `?`, serde).
// Dispatch is left out on purpose: the kinds' `run` functions (`src/dag/kinds.rs`),
// `defences::run_finetune_step` and the `run` methods of the registries' traits only route
// a step to its entry function and are reachable from no root, so an edit to IEU's stage 2
// changes the IEU finetune key and not the no-defence one, and the attacks' planning and
// preview code is in no identity. Keep such dispatchers free of arithmetic, and keep the
// registries out of reach of the entry functions.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use quote::ToTokens;

/// Crates whose version changes numerics; their locked versions enter every identity.
const NUMERIC_CRATES: &[&str] = &[
    "burn",
    "cubecl",
    "rand",
    "image",
    "zune-",
    "gemm",
    "matrixmultiply",
    "libm",
    "half",
    "safetensors",
    "png",
    "fdeflate",
    "macerator",
    "bytemuck",
];

#[derive(Debug)]
struct Node {
    module: String,
    name: String,
    /// `Some(T)` for items of `impl … T`.
    self_ty: Option<String>,
    what: What,
    /// Canonical token text (no comments, no doc attributes).
    text: String,
    refs: Vec<Ref>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum What {
    Fn,
    Type,
    Trait,
    Value,
    Macro,
    /// An `impl` block's header and associated types/consts; `true` for trait impls.
    ImplHeader(bool),
}

#[derive(Debug, Clone)]
enum Ref {
    Plain(String),
    Method(String),
    /// `a::b::name`: the segments before the name, and the name.
    Path(Vec<String>, String),
    Macro(String),
}

#[derive(Default)]
struct Crate {
    nodes: Vec<Node>,
    /// module -> its `use` declarations.
    aliases: HashMap<String, Uses>,
    /// Trait impl methods and inherent methods are nodes too; this maps a trait header to
    /// its methods.
    impl_members: HashMap<usize, Vec<usize>>,
}

/// Every identity's digest and item count, the numeric crates' versions, and a listing of
/// each identity's items with the chain of references that reached them.
pub fn identities(root: &Path) -> (Vec<(String, String, usize)>, String, String) {
    let mut krate = Crate::default();
    load_module(&mut krate, &root.join("src/lib.rs"), &root.join("src"), "");
    let mut deps = numeric_dependencies(&root.join("Cargo.lock"), &root.join("Cargo.toml"));
    let patched = patched_sources(&root.join("patches"));
    if !patched.is_empty() {
        deps.push_str(&format!(", patched sources {patched}"));
    }
    let index = Index::new(&krate);
    let mut debug = String::new();
    let mut ids = Vec::new();
    let mut all: Vec<(String, Vec<String>)> = kind_roots(&root.join("src/dag/kinds.rs"));
    // The `poison` kind: one identity per module of the attack registry, rooted at its `run`
    // (with the kind's own roots, if it has any), so an edit to one attack moves only the
    // poison steps of the attacks in that module.
    let poison_roots = all
        .iter()
        .find(|(kind, _)| kind == "poison")
        .map(|(_, roots)| roots.clone())
        .unwrap_or_default();
    all.retain(|(kind, roots)| kind != "poison" && !roots.is_empty());
    for module in registry_modules(&root.join("src/attacks/mod.rs")) {
        let mut roots = poison_roots.clone();
        roots.push(format!("attacks::{module}::run"));
        all.push((format!("poison/{}", module.replace('_', "-")), roots));
    }
    // The `dataset` kind: one identity per format module of `src/data` (those with a
    // `pub fn source`), rooted at that `source` and the kind's own roots (the common split),
    // so an edit to the synthetic generator moves no CIFAR-10 key.
    let dataset_roots = all
        .iter()
        .find(|(kind, _)| kind == "dataset")
        .map(|(_, roots)| roots.clone())
        .unwrap_or_default();
    all.retain(|(kind, _)| kind != "dataset");
    for module in source_modules(&root.join("src/data")) {
        let mut roots = dataset_roots.clone();
        roots.push(format!("data::{module}::source"));
        all.push((format!("dataset/{module}"), roots));
    }
    for module in registry_modules(&root.join("src/defences/mod.rs")) {
        let run = format!("defences::{module}::run");
        let has_run = krate.nodes.iter().any(|n| {
            n.module == format!("defences::{module}") && n.name == "run" && n.self_ty.is_none()
        });
        if has_run {
            all.push((format!("finetune/{}", module.replace('_', "-")), vec![run]));
        }
    }
    for (name, roots) in &all {
        let name = name.as_str();
        let mut start = Vec::new();
        for r in roots {
            let (module, item) = r.rsplit_once("::").unwrap_or(("", r));
            let found: Vec<usize> = (0..krate.nodes.len())
                .filter(|&i| {
                    let n = &krate.nodes[i];
                    n.module == module && n.name == item && n.self_ty.is_none()
                })
                .collect();
            if found.is_empty() {
                panic!("build.rs: code identity `{name}`: no function `{r}` in src/");
            }
            start.extend(found);
        }
        let parents = index.closure_with_parents(&krate, &start);
        for &i in parents.keys() {
            let mut chain = Vec::new();
            let mut at = Some(i);
            while let Some(j) = at {
                chain.push(krate.nodes[j].id());
                at = parents[&j];
            }
            debug.push_str(&format!("{name}\t{}\n", chain.join(" <- ")));
        }
        let mut items: Vec<String> = parents
            .keys()
            .map(|&i| {
                let n = &krate.nodes[i];
                format!(
                    "{}|{}|{}|{}",
                    n.module,
                    n.self_ty.as_deref().unwrap_or(""),
                    n.name,
                    n.text
                )
            })
            .collect();
        items.sort();
        let mut h = blake3::Hasher::new();
        h.update(b"ieu-bench code identity v1\n");
        h.update(deps.as_bytes());
        for it in &items {
            h.update(&(it.len() as u64).to_le_bytes());
            h.update(it.as_bytes());
        }
        ids.push((name.to_string(), h.finalize().to_hex().to_string(), items.len()));
    }
    (ids, deps, debug)
}

/// Each step kind's identity roots, from the `KINDS` table of `src/dag/kinds.rs`
/// (`kind: Kind::Pretrain, roots: &["train::pretrain::run_pretrain_step"]` → identity
/// `pretrain`). The `finetune` kind lists none: its identities are the defences'.
pub fn kind_roots(table: &Path) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(table)
        .unwrap_or_else(|e| panic!("build.rs: cannot read {}: {e}", table.display()));
    let start = text
        .find("pub static KINDS")
        .unwrap_or_else(|| panic!("build.rs: no `pub static KINDS` in {}", table.display()));
    let mut out = Vec::new();
    for row in text[start..].split("KindDef {").skip(1) {
        let Some(kind) = row
            .split_once("kind: Kind::")
            .and_then(|(_, r)| r.split(|c: char| !c.is_alphanumeric()).next())
        else {
            continue;
        };
        let roots = row
            .split_once("roots: &[")
            .and_then(|(_, r)| r.split_once(']'))
            .map(|(list, _)| {
                list.split('"')
                    .skip(1)
                    .step_by(2)
                    .map(|s| s.to_string())
                    .collect()
            })
            .unwrap_or_default();
        out.push((kind.to_lowercase(), roots));
    }
    out
}

/// The modules of `dir` (one file each) that define `pub fn source(`: the dataset formats,
/// sorted by name.
pub fn source_modules(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("build.rs: cannot read {}: {e}", dir.display()))
        .filter_map(|e| {
            let path = e.ok()?.path();
            let module = path.file_stem()?.to_str()?.to_string();
            let text = std::fs::read_to_string(&path).ok()?;
            (path.extension()? == "rs" && module != "mod" && text.contains("\npub fn source("))
                .then_some(module)
        })
        .collect();
    out.sort();
    out
}

/// The modules of the entries of a registry's `REGISTRY` (`&ieu::Ieu,` → `ieu`), in order,
/// each once. A defence with a `finetune` step of its own has `pub fn run` in its module:
/// that function is the root of its identity `finetune/<name>` (the module name with `-`
/// for `_`). Every attack module has `pub fn run`, its poison step: the root of its identity
/// `poison/<module>` (`poison/badnets` for both BadNets attacks).
pub fn registry_modules(registry: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(registry).unwrap_or_default();
    let Some(start) = text.find("pub static REGISTRY") else {
        panic!("build.rs: no `pub static REGISTRY` in {}", registry.display());
    };
    let body = &text[start..];
    let body = &body[body.find("= &[").map(|i| i + 4).unwrap_or(0)..];
    let body = &body[..body.find("];").unwrap_or(body.len())];
    let mut out: Vec<String> = Vec::new();
    for e in body.split(',') {
        let e = e.trim().trim_start_matches('&');
        if let Some((m, _)) = e.split_once("::") {
            let m = m.trim().to_string();
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

impl Node {
    fn id(&self) -> String {
        match &self.self_ty {
            Some(t) => format!("{}::{t}::{}", self.module, self.name),
            None => format!("{}::{}", self.module, self.name),
        }
    }
}

/// The locked versions of the numeric crates, and how the manifest asks for them (their
/// features change the arithmetic too: SIMD kernels, parallel GEMM).
fn numeric_dependencies(lock: &Path, manifest: &Path) -> String {
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in std::fs::read_to_string(manifest).unwrap_or_default().lines() {
        let name = line.split(['=', ' ']).next().unwrap_or("");
        if !name.is_empty() && NUMERIC_CRATES.iter().any(|p| name.starts_with(p)) {
            found.insert(format!("manifest: {}", line.trim()));
        }
    }
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ")
            && let Some(n) = name.take()
            && NUMERIC_CRATES.iter().any(|p| n.starts_with(p))
        {
            found.insert(format!("{n} {}", v.trim_matches('"')));
        }
    }
    found.into_iter().collect::<Vec<_>>().join(", ")
}

/// blake3 of the source of the crates under `patches/` (those patched in
/// `[patch.crates-io]`): every `.rs` file and `Cargo.toml`, path and content, in path order;
/// empty when there are none. Their versions in Cargo.lock do not change when their source
/// does, so the source itself is hashed (their notes and READMEs are not).
fn patched_sources(dir: &Path) -> String {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
            {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    if files.is_empty() {
        return String::new();
    }
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        let rel = f.strip_prefix(dir).unwrap_or(f).to_string_lossy().replace('\\', "/");
        h.update(rel.as_bytes());
        h.update(&[0]);
        h.update(&std::fs::read(f).unwrap_or_default());
        h.update(&[0]);
    }
    h.finalize().to_hex()[..16].to_string()
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.meta.to_token_stream().to_string().contains("test"))
}

fn load_module(k: &mut Crate, file: &Path, dir: &Path, module: &str) {
    let src = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("build.rs: cannot read {}: {e}", file.display()));
    let parsed = syn::parse_file(&src)
        .unwrap_or_else(|e| panic!("build.rs: cannot parse {}: {e}", file.display()));
    load_items(k, &parsed.items, dir, module);
}

fn load_items(k: &mut Crate, items: &[syn::Item], dir: &Path, module: &str) {
    for item in items {
        match item {
            syn::Item::Mod(m) => {
                if is_cfg_test(&m.attrs) {
                    continue;
                }
                let sub = join(module, &m.ident.to_string());
                match &m.content {
                    Some((_, inner)) => load_items(k, inner, &dir.join(m.ident.to_string()), &sub),
                    None => {
                        let name = m.ident.to_string();
                        let a = dir.join(format!("{name}.rs"));
                        let b = dir.join(&name).join("mod.rs");
                        let file = if a.is_file() { a } else { b };
                        load_module(k, &file, &dir.join(&name), &sub);
                    }
                }
            }
            syn::Item::Use(u) => {
                if !is_cfg_test(&u.attrs) {
                    let aliases = k.aliases.entry(module.to_string()).or_default();
                    collect_use(&u.tree, Vec::new(), aliases);
                }
            }
            syn::Item::Impl(imp) => {
                if is_cfg_test(&imp.attrs) {
                    continue;
                }
                let self_ty = type_name(&imp.self_ty);
                let is_trait = imp.trait_.is_some();
                let mut header = imp.clone();
                header.items.retain(|i| !matches!(i, syn::ImplItem::Fn(_)));
                header.items.retain(|i| !is_cfg_test(impl_item_attrs(i)));
                let h = push(
                    k,
                    module,
                    &self_ty,
                    None,
                    What::ImplHeader(is_trait),
                    header.to_token_stream(),
                );
                // The trait's name also links to the header (`impl Trait for T`).
                let mut members = Vec::new();
                for it in &imp.items {
                    if let syn::ImplItem::Fn(f) = it {
                        if is_cfg_test(&f.attrs) {
                            continue;
                        }
                        let i = push(
                            k,
                            module,
                            &f.sig.ident.to_string(),
                            Some(self_ty.clone()),
                            What::Fn,
                            f.to_token_stream(),
                        );
                        members.push(i);
                    }
                }
                k.impl_members.insert(h, members);
            }
            other => {
                let attrs = item_attrs(other);
                if attrs.map(is_cfg_test).unwrap_or(false) {
                    continue;
                }
                let (name, what) = match other {
                    syn::Item::Fn(f) => (f.sig.ident.to_string(), What::Fn),
                    syn::Item::Struct(s) => (s.ident.to_string(), What::Type),
                    syn::Item::Enum(e) => (e.ident.to_string(), What::Type),
                    syn::Item::Union(u) => (u.ident.to_string(), What::Type),
                    syn::Item::Type(t) => (t.ident.to_string(), What::Type),
                    syn::Item::Trait(t) => (t.ident.to_string(), What::Trait),
                    syn::Item::Const(c) => (c.ident.to_string(), What::Value),
                    syn::Item::Static(s) => (s.ident.to_string(), What::Value),
                    syn::Item::Macro(m) => match &m.ident {
                        Some(id) => (id.to_string(), What::Macro),
                        // An item-level macro call (e.g. `thread_local!`): it has no name
                        // to be reached by, so every identity includes it (its tokens tell
                        // it apart; never its position, which moves with unrelated edits).
                        None => ("<macro>".to_string(), What::Value),
                    },
                    _ => continue,
                };
                push(k, module, &name, None, what, other.to_token_stream());
            }
        }
    }
}

fn impl_item_attrs(i: &syn::ImplItem) -> &[syn::Attribute] {
    match i {
        syn::ImplItem::Const(c) => &c.attrs,
        syn::ImplItem::Fn(f) => &f.attrs,
        syn::ImplItem::Type(t) => &t.attrs,
        syn::ImplItem::Macro(m) => &m.attrs,
        _ => &[],
    }
}

fn item_attrs(i: &syn::Item) -> Option<&[syn::Attribute]> {
    Some(match i {
        syn::Item::Fn(x) => &x.attrs,
        syn::Item::Struct(x) => &x.attrs,
        syn::Item::Enum(x) => &x.attrs,
        syn::Item::Union(x) => &x.attrs,
        syn::Item::Type(x) => &x.attrs,
        syn::Item::Trait(x) => &x.attrs,
        syn::Item::Const(x) => &x.attrs,
        syn::Item::Static(x) => &x.attrs,
        syn::Item::Macro(x) => &x.attrs,
        _ => return None,
    })
}

fn push(
    k: &mut Crate,
    module: &str,
    name: &str,
    self_ty: Option<String>,
    what: What,
    tokens: TokenStream,
) -> usize {
    let tokens = strip_docs(tokens);
    let mut refs = Vec::new();
    collect_refs(tokens.clone(), &mut refs);
    k.nodes.push(Node {
        module: module.to_string(),
        name: name.to_string(),
        self_ty,
        what,
        text: tokens.to_string(),
        refs,
    });
    k.nodes.len() - 1
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}::{b}")
    }
}

fn type_name(t: &syn::Type) -> String {
    match t {
        syn::Type::Path(p) => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default(),
        syn::Type::Reference(r) => type_name(&r.elem),
        other => other.to_token_stream().to_string(),
    }
}

/// Records `use` paths: alias -> (target name, path segments before it); globs as
/// `"*"`-named entries keyed by their path.
fn collect_use(tree: &syn::UseTree, path: Vec<String>, out: &mut Uses) {
    match tree {
        syn::UseTree::Path(p) => {
            let mut next = path;
            next.push(p.ident.to_string());
            collect_use(&p.tree, next, out)
        }
        syn::UseTree::Name(n) => {
            let id = n.ident.to_string();
            if id == "self" {
                // `use a::b::{self}`: the module `b` under its own name.
                if let Some(last) = path.last() {
                    out.names.insert(
                        last.clone(),
                        (last.clone(), path[..path.len() - 1].to_vec()),
                    );
                }
            } else {
                out.names.insert(id.clone(), (id, path));
            }
        }
        syn::UseTree::Rename(r) => {
            out.names
                .insert(r.rename.to_string(), (r.ident.to_string(), path));
        }
        syn::UseTree::Group(g) => {
            for t in &g.items {
                collect_use(t, path.clone(), out);
            }
        }
        syn::UseTree::Glob(_) => out.globs.push(path),
    }
}

#[derive(Default, Debug)]
struct Uses {
    names: HashMap<String, (String, Vec<String>)>,
    globs: Vec<Vec<String>>,
}

/// Removes `#[doc = …]` / `#![doc = …]` (doc comments) at every depth.
fn strip_docs(ts: TokenStream) -> TokenStream {
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        if let TokenTree::Punct(p) = &toks[i]
            && p.as_char() == '#'
        {
            let mut j = i + 1;
            if matches!(toks.get(j), Some(TokenTree::Punct(q)) if q.as_char() == '!') {
                j += 1;
            }
            if let Some(TokenTree::Group(g)) = toks.get(j)
                && g.delimiter() == Delimiter::Bracket
            {
                let first = g.stream().into_iter().next();
                if matches!(first, Some(TokenTree::Ident(ref id)) if id == "doc") {
                    i = j + 1;
                    continue;
                }
            }
        }
        match &toks[i] {
            TokenTree::Group(g) => {
                let mut ng = proc_macro2::Group::new(g.delimiter(), strip_docs(g.stream()));
                ng.set_span(g.span());
                out.push(TokenTree::Group(ng));
            }
            t => out.push(t.clone()),
        }
        i += 1;
    }
    out.into_iter().collect()
}

/// Every identifier with what qualifies it: `.x` (method), `seg::x` (path), or nothing.
fn collect_refs(ts: TokenStream, out: &mut Vec<Ref>) {
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    for (i, t) in toks.iter().enumerate() {
        match t {
            TokenTree::Group(g) => collect_refs(g.stream(), out),
            TokenTree::Ident(id) => {
                let name = id.to_string();
                let punct = |k: usize, c: char| matches!(toks.get(k), Some(TokenTree::Punct(p)) if p.as_char() == c);
                if i >= 1 && punct(i - 1, '.') {
                    out.push(Ref::Method(name));
                } else if punct(i + 1, '!') && !punct(i + 2, '=') {
                    out.push(Ref::Macro(name));
                } else if i >= 3 && punct(i - 1, ':') && punct(i - 2, ':') {
                    // `a::b::name`: collect the segments (`a::<T>::name` falls back to the
                    // identifiers it has).
                    let mut segs = Vec::new();
                    let mut j = i;
                    while j >= 3 && punct(j - 1, ':') && punct(j - 2, ':') {
                        match &toks[j - 3] {
                            TokenTree::Ident(seg) => {
                                segs.push(seg.to_string());
                                j -= 3;
                            }
                            _ => break,
                        }
                    }
                    segs.reverse();
                    if segs.is_empty() {
                        out.push(Ref::Plain(name));
                    } else {
                        out.push(Ref::Path(segs, name));
                    }
                } else {
                    out.push(Ref::Plain(name));
                }
            }
            _ => {}
        }
    }
}

struct Index {
    /// Non-method items by name.
    by_name: HashMap<String, Vec<usize>>,
    /// Impl methods and traits by method name.
    methods: HashMap<String, Vec<usize>>,
    /// (self type, method name) -> impl methods.
    typed: HashMap<(String, String), Vec<usize>>,
    /// Type name -> impl headers.
    headers: HashMap<String, Vec<usize>>,
    /// Every module path (`""` is the crate root).
    modules: BTreeSet<String>,
    types: BTreeSet<String>,
}

impl Index {
    fn new(k: &Crate) -> Self {
        let mut ix = Index {
            by_name: HashMap::new(),
            methods: HashMap::new(),
            typed: HashMap::new(),
            headers: HashMap::new(),
            modules: BTreeSet::new(),
            types: BTreeSet::new(),
        };
        for (i, n) in k.nodes.iter().enumerate() {
            let mut m = n.module.as_str();
            loop {
                ix.modules.insert(m.to_string());
                match m.rsplit_once("::") {
                    Some((parent, _)) => m = parent,
                    None if !m.is_empty() => m = "",
                    None => break,
                }
            }
            match (n.what, &n.self_ty) {
                (What::ImplHeader(_), _) => {
                    ix.headers.entry(n.name.clone()).or_default().push(i);
                    // The trait a header implements links to it too.
                }
                (What::Fn, Some(t)) => {
                    ix.methods.entry(n.name.clone()).or_default().push(i);
                    ix.typed
                        .entry((t.clone(), n.name.clone()))
                        .or_default()
                        .push(i);
                }
                _ => {
                    ix.by_name.entry(n.name.clone()).or_default().push(i);
                    if matches!(n.what, What::Type | What::Trait) {
                        ix.types.insert(n.name.clone());
                    }
                    if n.what == What::Trait {
                        // A trait's provided methods are called as methods.
                        for r in trait_methods(&n.text) {
                            ix.methods.entry(r).or_default().push(i);
                        }
                    }
                }
            }
        }
        ix
    }

    fn global(&self, name: &str) -> Vec<usize> {
        self.by_name.get(name).cloned().unwrap_or_default()
    }

    /// Non-method items named `name` in module `module`, following that module's `use`
    /// declarations (re-exports) and globs.
    fn in_module(&self, k: &Crate, module: &str, name: &str, depth: usize) -> Vec<usize> {
        if depth > 8 {
            return Vec::new();
        }
        let found: Vec<usize> = self
            .by_name
            .get(name)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&i| k.nodes[i].module == module)
                    .collect()
            })
            .unwrap_or_default();
        if !found.is_empty() {
            return found;
        }
        if let Some(uses) = k.aliases.get(module) {
            if let Some((target, path)) = uses.names.get(name) {
                if let Some(m) = self.module_of(k, module, path) {
                    return self.in_module(k, &m, target, depth + 1);
                }
                return Vec::new();
            }
            for g in &uses.globs {
                if let Some(m) = self.module_of(k, module, g) {
                    let v = self.in_module(k, &m, name, depth + 1);
                    if !v.is_empty() {
                        return v;
                    }
                }
            }
        }
        Vec::new()
    }

    /// The crate module a path written in `from` names, if it is one of ours.
    fn module_of(&self, k: &Crate, from: &str, path: &[String]) -> Option<String> {
        self.module_of_d(k, from, path, 0)
    }

    fn module_of_d(&self, k: &Crate, from: &str, path: &[String], depth: usize) -> Option<String> {
        if depth > 8 {
            return None;
        }
        let mut cur: Vec<String> = if from.is_empty() {
            Vec::new()
        } else {
            from.split("::").map(String::from).collect()
        };
        let mut rest = path;
        match path.first().map(String::as_str) {
            Some("crate") => {
                cur.clear();
                rest = &path[1..];
            }
            Some("self") => rest = &path[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    cur.pop();
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                // Relative to the current module, or a module this one imported by name.
                let mut here = cur.clone();
                here.push(first.to_string());
                if self.modules.contains(&here.join("::")) {
                    cur = here;
                    rest = &path[1..];
                } else if let Some((target, p)) =
                    k.aliases.get(from).and_then(|u| u.names.get(first))
                {
                    let mut full = p.clone();
                    full.push(target.clone());
                    let m = self.module_of_d(k, from, &full, depth + 1)?;
                    cur = m
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect();
                    rest = &path[1..];
                } else if self.modules.contains(first) {
                    cur = vec![first.to_string()];
                    rest = &path[1..];
                } else {
                    return None;
                }
            }
            None => {}
        }
        for seg in rest {
            cur.push(seg.clone());
        }
        let m = cur.join("::");
        self.modules.contains(&m).then_some(m)
    }

    fn resolve(
        &self,
        k: &Crate,
        from: &Node,
        r: &Ref,
        out: &mut Vec<usize>,
        methods: &mut Vec<String>,
    ) {
        match r {
            Ref::Method(name) => methods.push(name.clone()),
            Ref::Macro(name) => out.extend(
                self.global(name)
                    .into_iter()
                    .filter(|&i| k.nodes[i].what == What::Macro),
            ),
            Ref::Plain(name) => out.extend(self.in_module(k, &from.module, name, 0)),
            Ref::Path(segs, name) => {
                let last = segs.last().unwrap();
                if last == "Self" {
                    match &from.self_ty {
                        Some(t) => match self.typed.get(&(t.clone(), name.clone())) {
                            Some(v) => out.extend(v.iter().copied()),
                            None => methods.push(name.clone()),
                        },
                        None => methods.push(name.clone()),
                    }
                    return;
                }
                if let Some(m) = self.module_of(k, &from.module, segs) {
                    out.extend(self.in_module(k, &m, name, 0));
                    return;
                }
                // `Type::name`: the type's associated function, or (a trait's function, an
                // enum variant) a method of that name on reachable types.
                let (tseg, tmod) = (last.clone(), &segs[..segs.len() - 1]);
                let is_local_type = if tmod.is_empty() {
                    !self.in_module(k, &from.module, &tseg, 0).is_empty()
                } else {
                    self.module_of(k, &from.module, tmod)
                        .is_some_and(|m| !self.in_module(k, &m, &tseg, 0).is_empty())
                };
                if is_local_type {
                    let target = self
                        .in_module(k, &from.module, &tseg, 0)
                        .first()
                        .map(|&i| k.nodes[i].name.clone())
                        .unwrap_or(tseg);
                    match self.typed.get(&(target, name.clone())) {
                        Some(v) => out.extend(v.iter().copied()),
                        None => methods.push(name.clone()),
                    }
                }
                // Otherwise an external path (std, burn, …): nothing of ours.
            }
        }
    }

    /// Reachable items, each with the item that first reached it. Methods called as
    /// `.name(` resolve among the impls of types already reachable (a value of a type can
    /// only exist where code that names the type runs), iterated to a fixpoint.
    fn closure_with_parents(
        &self,
        k: &Crate,
        start: &[usize],
    ) -> std::collections::BTreeMap<usize, Option<usize>> {
        let mut seen = std::collections::BTreeMap::new();
        let mut queue: VecDeque<(usize, Option<usize>)> =
            start.iter().map(|&i| (i, None)).collect();
        // Item-level macro calls have no name to be reached by: include them always.
        for (i, n) in k.nodes.iter().enumerate() {
            if n.name == "<macro>" {
                queue.push_back((i, None));
            }
        }
        // Method names called so far (with a caller), and reachable type names.
        let mut called: HashMap<String, usize> = HashMap::new();
        let mut types: BTreeSet<String> = BTreeSet::new();
        loop {
            while let Some((i, parent)) = queue.pop_front() {
                if seen.contains_key(&i) {
                    continue;
                }
                seen.insert(i, parent);
                let n = &k.nodes[i];
                let p = Some(i);
                let mut out = Vec::new();
                let mut methods = Vec::new();
                for r in &n.refs {
                    self.resolve(k, n, r, &mut out, &mut methods);
                }
                queue.extend(out.into_iter().map(|j| (j, p)));
                for m in methods {
                    called.entry(m).or_insert(i);
                }
                match n.what {
                    What::Type | What::Trait => {
                        types.insert(n.name.clone());
                        if let Some(h) = self.headers.get(&n.name) {
                            queue.extend(h.iter().map(|&j| (j, p)));
                        }
                    }
                    What::Fn => {
                        if let Some(t) = &n.self_ty
                            && let Some(h) = self.headers.get(t)
                        {
                            queue.extend(h.iter().map(|&j| (j, p)));
                        }
                    }
                    What::ImplHeader(true) => {
                        if let Some(m) = k.impl_members.get(&i) {
                            queue.extend(m.iter().map(|&j| (j, p)));
                        }
                    }
                    _ => {}
                }
            }
            // Methods called on reachable types (and provided methods of reachable traits).
            for (m, &caller) in &called {
                for &j in self.methods.get(m).into_iter().flatten() {
                    let n = &k.nodes[j];
                    let owner = n.self_ty.clone().unwrap_or_else(|| n.name.clone());
                    if types.contains(&owner) && !seen.contains_key(&j) {
                        queue.push_back((j, Some(caller)));
                    }
                }
            }
            if queue.is_empty() {
                return seen;
            }
        }
    }
}

/// Names of the `fn`s declared in a trait's token text.
fn trait_methods(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "fn")
        .map(|w| {
            w[1].trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_')
                .to_string()
        })
        .collect()
}
