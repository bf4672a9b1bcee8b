//! The zip container of a `.pth` file: the stored (uncompressed) entries `torch.save`
//! writes, located through the central directory (zip64 included).

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};

/// The stored entries of a zip archive: name → (offset of the data, size).
pub(super) fn zip_entries(bytes: &[u8]) -> Result<BTreeMap<String, (usize, usize)>> {
    let u16_at = |o: usize| -> Result<usize> {
        bytes
            .get(o..o.saturating_add(2))
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| anyhow!("truncated zip"))
    };
    let u32_at = |o: usize| -> Result<usize> {
        bytes
            .get(o..o.saturating_add(4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| anyhow!("truncated zip"))
    };
    let u64_at = |o: usize| -> Result<usize> {
        bytes
            .get(o..o.saturating_add(8))
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
            .ok_or_else(|| anyhow!("truncated zip"))
    };
    // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
    let lo = bytes.len().saturating_sub(65_557);
    let eocd = (lo..bytes.len().saturating_sub(21))
        .rev()
        .find(|&i| bytes[i..i + 4] == *b"PK\x05\x06")
        .ok_or_else(|| anyhow!("not a zip archive (no end-of-central-directory record)"))?;
    let mut count = u16_at(eocd + 10)?;
    let mut cd = u32_at(eocd + 16)?;
    if (count == 0xFFFF || cd == 0xFFFF_FFFF)
        && eocd >= 20
        && bytes[eocd - 20..eocd - 16] == *b"PK\x06\x07"
    {
        // Zip64: the locator points at the zip64 end-of-central-directory record.
        let rec = u64_at(eocd - 20 + 8)?;
        if bytes.get(rec..rec.saturating_add(4)) != Some(b"PK\x06\x06") {
            bail!("bad zip64 end-of-central-directory record");
        }
        count = u64_at(rec + 32)?;
        cd = u64_at(rec + 48)?;
    }
    let mut out = BTreeMap::new();
    let mut p = cd;
    for _ in 0..count {
        if bytes.get(p..p.saturating_add(4)) != Some(b"PK\x01\x02") {
            bail!("bad zip central directory entry at byte {p}");
        }
        let method = u16_at(p + 10)?;
        let mut size = u32_at(p + 24)?;
        let name_len = u16_at(p + 28)?;
        let extra_len = u16_at(p + 30)?;
        let comment_len = u16_at(p + 32)?;
        let mut local = u32_at(p + 42)?;
        let name = String::from_utf8_lossy(
            bytes
                .get(p + 46..p + 46 + name_len)
                .ok_or_else(|| anyhow!("truncated zip"))?,
        )
        .into_owned();
        // Zip64 extra field: sizes and offset that overflow 32 bits.
        let mut e = p + 46 + name_len;
        let end = e + extra_len;
        while e + 4 <= end {
            let (id, len) = (u16_at(e)?, u16_at(e + 2)?);
            if id == 1 {
                let mut f = e + 4;
                if u32_at(p + 24)? == 0xFFFF_FFFF {
                    size = u64_at(f)?;
                    f += 8;
                }
                if u32_at(p + 20)? == 0xFFFF_FFFF {
                    f += 8;
                }
                if u32_at(p + 42)? == 0xFFFF_FFFF {
                    local = u64_at(f)?;
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            bail!(
                "zip entry {name} is compressed (method {method}); torch.save writes stored entries"
            );
        }
        if bytes.get(local..local.saturating_add(4)) != Some(b"PK\x03\x04") {
            bail!("bad zip local header for {name}");
        }
        let data = local + 30 + u16_at(local + 26)? + u16_at(local + 28)?;
        if data.saturating_add(size) > bytes.len() {
            bail!("zip entry {name} runs past the end of the file");
        }
        out.insert(name, (data, size));
        p = end + comment_len;
    }
    Ok(out)
}
