//! Reading PyTorch `.pth` checkpoints (the `torch.save` zip format) without Python.
//!
//! No maintained Rust crate for this is available offline (burn-store's `pytorch` feature
//! needs the `pytorch-reader` crate, which is not in the local registry), so this file
//! reads the format itself:
//!
//! * the file is a zip archive with uncompressed ("stored") entries `ARCHIVE/data.pkl`,
//!   `ARCHIVE/data/<key>` (one raw little-endian storage per key), `ARCHIVE/version`, …;
//! * `data.pkl` is a pickle (protocol 2) of the saved object. Tensors appear as
//!   `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`
//!   whose `storage` is a persistent id `('storage', torch.FloatStorage, key, device, numel)`;
//!   `torch._utils._rebuild_parameter` wraps a tensor; `collections.OrderedDict()` builds a
//!   dict. Any other class (argparse.Namespace, optimiser state, …) becomes an opaque
//!   object that is kept out of the way.
//!
//! Only what a checkpoint of weights needs is supported: float32, float16 and bfloat16
//! storages (converted to f32), strided views of them, and the pickle opcodes that
//! `torch.save` emits. Anything else is an error naming the file, never a panic.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use super::Named;

mod zip;
use zip::zip_entries;

// ---------------------------------------------------------------------------------------
// Pickle

/// A pickled value, as far as a checkpoint needs.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global reference `module.name`.
    Global(String, String),
    /// A storage persistent id: (key, dtype name such as `FloatStorage`).
    Storage(String, String),
    Tensor(TensorRef),
    /// An instance of a class we do not interpret.
    Object(String),
}

/// A tensor in the archive: a strided view of a storage.
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub storage: String,
    pub dtype: String,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => bail!("expected an integer, got {other:?}"),
    }
}

fn ints(v: &Value) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(t) | Value::List(t) => t
            .iter()
            .map(|x| int(x).and_then(|i| usize::try_from(i).map_err(|_| anyhow!("negative size"))))
            .collect(),
        other => bail!("expected a tuple of integers, got {other:?}"),
    }
}

/// Applies a callable to its arguments (REDUCE / NEWOBJ).
fn call(f: Value, args: Value) -> Result<Value> {
    let args = match args {
        Value::Tuple(a) => a,
        other => vec![other],
    };
    Ok(match &f {
        Value::Global(m, n) => match (m.as_str(), n.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                let Some(Value::Storage(key, dtype)) = args.first() else {
                    bail!("{m}.{n}: the first argument is not a storage");
                };
                Value::Tensor(TensorRef {
                    storage: key.clone(),
                    dtype: dtype.clone(),
                    offset: usize::try_from(int(args.get(1).unwrap_or(&Value::Int(0)))?)?,
                    shape: ints(args.get(2).ok_or_else(|| anyhow!("{n}: no size"))?)?,
                    stride: ints(args.get(3).ok_or_else(|| anyhow!("{n}: no stride"))?)?,
                })
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                args.into_iter().next().unwrap_or(Value::None)
            }
            ("collections", "OrderedDict") | ("builtins", "dict") => Value::Dict(Vec::new()),
            _ => Value::Object(format!("{m}.{n}")),
        },
        _ => Value::Object("?".into()),
    })
}

/// The next `n` bytes of `data` at `*i`.
fn take<'a>(data: &'a [u8], i: &mut usize, n: usize) -> Result<&'a [u8]> {
    let s = data
        .get(*i..i.saturating_add(n))
        .ok_or_else(|| anyhow!("pickle truncated at byte {}", *i))?;
    *i += n;
    Ok(s)
}

/// A newline-terminated text argument at `*i`.
fn line(data: &[u8], i: &mut usize) -> Result<String> {
    let rest = &data[*i..];
    let n = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| anyhow!("pickle truncated in a text argument"))?;
    *i += n + 1;
    Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
}

/// Runs the pickle machine over `data` and returns the unpickled object.
pub fn unpickle(data: &[u8]) -> Result<Value> {
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: BTreeMap<u32, Value> = BTreeMap::new();
    let mut i = 0usize;
    macro_rules! pop {
        () => {
            stack
                .pop()
                .ok_or_else(|| anyhow!("pickle stack underflow at byte {i}"))?
        };
    }
    macro_rules! pop_mark {
        () => {{
            let m = marks
                .pop()
                .ok_or_else(|| anyhow!("pickle mark missing at byte {i}"))?;
            if m > stack.len() {
                bail!("pickle mark past the stack at byte {i}");
            }
            stack.split_off(m)
        }};
    }
    loop {
        let op = *data.get(i).ok_or_else(|| anyhow!("pickle has no STOP"))?;
        let at = i;
        i += 1;
        match op {
            0x80 => {
                take(data, &mut i, 1)?; // PROTO
            }
            0x95 => {
                take(data, &mut i, 8)?; // FRAME
            }
            b'.' => return stack.pop().ok_or_else(|| anyhow!("empty pickle")),
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => {
                let v = take(data, &mut i, 1)?[0];
                stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let b = take(data, &mut i, 2)?;
                stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
            }
            b'J' => {
                let b = take(data, &mut i, 4)?;
                stack.push(Value::Int(i32::from_le_bytes(b.try_into().unwrap()) as i64));
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = take(data, &mut i, 1)?[0] as usize;
                let b = take(data, &mut i, n)?;
                if n > 8 {
                    bail!("pickle integer of {n} bytes at byte {at}");
                }
                let mut v: i64 = 0;
                for (k, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * k);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                let b = take(data, &mut i, 8)?;
                stack.push(Value::Float(f64::from_be_bytes(b.try_into().unwrap())));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => u32::from_le_bytes(take(data, &mut i, 4)?.try_into().unwrap()) as usize,
                    0x8c => take(data, &mut i, 1)?[0] as usize,
                    _ => u64::from_le_bytes(take(data, &mut i, 8)?.try_into().unwrap()) as usize,
                };
                let s = take(data, &mut i, n)?;
                stack.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
            }
            b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'C' => take(data, &mut i, 1)?[0] as usize,
                    b'B' => u32::from_le_bytes(take(data, &mut i, 4)?.try_into().unwrap()) as usize,
                    _ => u64::from_le_bytes(take(data, &mut i, 8)?.try_into().unwrap()) as usize,
                };
                stack.push(Value::Bytes(take(data, &mut i, n)?.to_vec()));
            }
            b't' => {
                let items = pop_mark!();
                stack.push(Value::Tuple(items));
            }
            0x85 | 0x86 | 0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow at byte {at}");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = pop_mark!();
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark!();
                let mut d = Vec::new();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                stack.push(Value::Dict(d));
            }
            0x8f => stack.push(Value::List(Vec::new())), // EMPTY_SET (kept as a list)
            0x90 | 0x91 => {
                // ADDITEMS / FROZENSET
                let items = pop_mark!();
                if op == 0x91 {
                    stack.push(Value::List(items));
                } else if let Some(Value::List(l)) = stack.last_mut() {
                    l.extend(items);
                }
            }
            b'a' => {
                let v = pop!();
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.push(v);
                }
            }
            b'e' => {
                let items = pop_mark!();
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.extend(items);
                }
            }
            b's' => {
                let v = pop!();
                let k = pop!();
                if let Some(Value::Dict(d)) = stack.last_mut() {
                    d.push((k, v));
                }
            }
            b'u' => {
                let items = pop_mark!();
                if let Some(Value::Dict(d)) = stack.last_mut() {
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
            }
            b'c' => {
                let module = line(data, &mut i)?;
                let name = line(data, &mut i)?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop!();
                let module = pop!();
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => bail!("pickle STACK_GLOBAL without strings at byte {at}"),
                }
            }
            b'R' | 0x81 => {
                let args = pop!();
                let f = pop!();
                stack.push(call(f, args)?);
            }
            0x92 => {
                // NEWOBJ_EX: cls, args, kwargs
                let _kwargs = pop!();
                let args = pop!();
                let f = pop!();
                stack.push(call(f, args)?);
            }
            b'b' => {
                // BUILD: set an object's state. Only a dict's matters (OrderedDict state).
                let state = pop!();
                if let (Some(Value::Dict(d)), Value::Dict(s)) = (stack.last_mut(), state) {
                    d.extend(s);
                }
            }
            b'Q' => {
                // BINPERSID: ('storage', StorageType, key, location, numel)
                let pid = pop!();
                let Value::Tuple(t) = pid else {
                    bail!("pickle persistent id at byte {at} is not a tuple");
                };
                match (t.first(), t.get(1), t.get(2)) {
                    (Some(Value::Str(s)), Some(Value::Global(_, ty)), Some(Value::Str(key)))
                        if s == "storage" =>
                    {
                        stack.push(Value::Storage(key.clone(), ty.clone()))
                    }
                    _ => bail!("unsupported persistent id at byte {at}: {t:?}"),
                }
            }
            b'q' => {
                let k = take(data, &mut i, 1)?[0] as u32;
                memo.insert(k, stack.last().cloned().unwrap_or(Value::None));
            }
            b'r' => {
                let k = u32::from_le_bytes(take(data, &mut i, 4)?.try_into().unwrap());
                memo.insert(k, stack.last().cloned().unwrap_or(Value::None));
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, stack.last().cloned().unwrap_or(Value::None));
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    take(data, &mut i, 1)?[0] as u32
                } else {
                    u32::from_le_bytes(take(data, &mut i, 4)?.try_into().unwrap())
                };
                let v = memo
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| anyhow!("pickle memo {k} missing at byte {at}"))?;
                stack.push(v);
            }
            b'0' => {
                pop!();
            }
            b'2' => {
                let v = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| anyhow!("pickle DUP on empty stack"))?;
                stack.push(v);
            }
            b'1' => {
                let _ = pop_mark!();
            }
            other => bail!("unsupported pickle opcode 0x{other:02x} at byte {at}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checkpoints

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// IEEE half-precision little-endian values as f32.
pub fn half_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(2)
        .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

fn f32_le(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn f16_le(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}
fn bf16_le(b: &[u8]) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
}
fn f64_le(b: &[u8]) -> f32 {
    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
}

/// Element size and f32 conversion of a storage type.
type Conv = fn(&[u8]) -> f32;
fn element(dtype: &str) -> Result<(usize, Conv)> {
    Ok(match dtype {
        "FloatStorage" => (4, f32_le as Conv),
        "HalfStorage" => (2, f16_le as Conv),
        "BFloat16Storage" => (2, bf16_le as Conv),
        "DoubleStorage" => (8, f64_le as Conv),
        other => {
            bail!("unsupported storage type {other} (float32, float16, bfloat16, float64 only)")
        }
    })
}

/// Every float tensor of a `torch.save` checkpoint, by dotted path: nested dicts are
/// flattened (`teacher.module.backbone.blocks.0.norm1.weight`). Non-tensor values and
/// non-float tensors are skipped.
pub fn read(path: &Path) -> Result<Named> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_bytes(&bytes)
        .with_context(|| format!("{} is not a readable PyTorch checkpoint", path.display()))
}

pub fn read_bytes(bytes: &[u8]) -> Result<Named> {
    let entries = zip_entries(bytes)?;
    let (pkl, &(off, len)) = entries
        .iter()
        .find(|(n, _)| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
        .ok_or_else(|| {
            anyhow!("no data.pkl in the archive (a legacy non-zip torch.save file? re-save it with torch >= 1.6)")
        })?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let root = unpickle(&bytes[off..off + len])?;
    let mut tensors: Vec<(String, TensorRef)> = Vec::new();
    flatten("", &root, &mut tensors);
    let mut out = Named::new();
    for (name, t) in tensors {
        let Ok((esize, conv)) = element(&t.dtype) else {
            continue; // integer tensors (e.g. step counters) are not weights
        };
        let entry = format!("{prefix}data/{}", t.storage);
        let &(so, sl) = entries
            .get(&entry)
            .ok_or_else(|| anyhow!("{name}: storage {entry} is missing from the archive"))?;
        let vals =
            gather(&t, &bytes[so..so + sl], esize, conv).map_err(|e| anyhow!("{name}: {e}"))?;
        out.insert(name, (t.shape.clone(), vals));
    }
    Ok(out)
}

/// The elements of a strided view, in row-major order.
fn gather(t: &TensorRef, storage: &[u8], esize: usize, conv: Conv) -> Result<Vec<f32>> {
    if t.stride.len() != t.shape.len() {
        bail!(
            "{} strides for {} dimensions",
            t.stride.len(),
            t.shape.len()
        );
    }
    // The last element addressed must lie in the storage (this also bounds `n`).
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            a.checked_add(d.saturating_sub(1).checked_mul(s)?)
        });
    let n = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 28); // 1 GiB of f32: far above any weight tensor
    let (Some(last), Some(n)) = (last, n) else {
        bail!("shape {:?} / stride {:?} overflow", t.shape, t.stride);
    };
    if n > 0 && last.saturating_add(1).saturating_mul(esize) > storage.len() {
        bail!("element {last} lies outside its storage");
    }
    let mut vals = Vec::with_capacity(n);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let e = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        let b = storage
            .get(e * esize..(e + 1) * esize)
            .ok_or_else(|| anyhow!("element {e} lies outside its storage"))?;
        vals.push(conv(b));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(vals)
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, TensorRef)>) {
    match v {
        Value::Tensor(t) => out.push((prefix.to_string(), t.clone())),
        Value::Dict(d) => {
            for (k, v) in d {
                let k = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
pub mod tests;
