use super::*;

/// A minimal `torch.save` writer for tests: a stored zip holding `archive/data.pkl` (a
/// protocol-2 pickle of `{outer: OrderedDict(name → tensor)}` written with the same
/// opcodes torch.save uses: PROTO, EMPTY_DICT, BINPUT, MARK, BINUNICODE, GLOBAL,
/// BINPERSID, TUPLE, REDUCE, SETITEMS, STOP) and `archive/data/<i>` float32 storages.
pub fn write_pth(outer: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let mut memo = 0u8;
    let mut put = |p: &mut Vec<u8>| {
        p.extend([b'q', memo]);
        memo = memo.wrapping_add(1);
    };
    let s = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let k = |p: &mut Vec<u8>, v: usize| {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    };
    p.push(b'}');
    put(&mut p);
    p.push(b'(');
    s(&mut p, outer);
    p.extend(b"ccollections\nOrderedDict\n");
    put(&mut p);
    p.extend([b')', b'R']);
    put(&mut p);
    p.push(b'(');
    let mut files = Vec::new();
    for (i, (name, shape, vals)) in tensors.iter().enumerate() {
        s(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
        p.extend([b'(', b'(']);
        s(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        s(&mut p, &i.to_string());
        s(&mut p, "cpu");
        k(&mut p, vals.len());
        p.extend([b't', b'Q']);
        k(&mut p, 0);
        p.push(b'(');
        shape.iter().for_each(|&d| k(&mut p, d));
        p.push(b't');
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        p.push(b'(');
        stride.iter().for_each(|&d| k(&mut p, d));
        p.push(b't');
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n");
        p.extend([b')', b'R', b't', b'R']);
        put(&mut p);
        files.push((
            format!("archive/data/{i}"),
            vals.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ));
    }
    p.extend([b'u', b'u', b'.']);
    files.insert(0, ("archive/data.pkl".to_string(), p));
    files.push(("archive/version".to_string(), b"3\n".to_vec()));
    zip_stored(&files)
}

/// A zip archive of stored (uncompressed) entries; CRCs are left 0 (not checked here).
fn zip_stored(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data) in files {
        let off = out.len() as u32;
        let le16 = |v: usize| (v as u16).to_le_bytes();
        let le32 = |v: usize| (v as u32).to_le_bytes();
        out.extend(b"PK\x03\x04");
        out.extend(le16(20));
        out.extend([0; 8]); // flags, method 0, time, date
        out.extend([0; 4]); // crc
        out.extend(le32(data.len()));
        out.extend(le32(data.len()));
        out.extend(le16(name.len()));
        out.extend(le16(0));
        out.extend(name.as_bytes());
        out.extend(data);
        cd.extend(b"PK\x01\x02");
        cd.extend(le16(20));
        cd.extend(le16(20));
        cd.extend([0; 8]);
        cd.extend([0; 4]);
        cd.extend(le32(data.len()));
        cd.extend(le32(data.len()));
        cd.extend(le16(name.len()));
        cd.extend([0; 8]); // extra, comment, disk, internal attrs
        cd.extend([0; 4]); // external attrs
        cd.extend(off.to_le_bytes());
        cd.extend(name.as_bytes());
    }
    let cd_off = out.len();
    out.extend(&cd);
    out.extend(b"PK\x05\x06");
    out.extend([0; 4]);
    out.extend((files.len() as u16).to_le_bytes());
    out.extend((files.len() as u16).to_le_bytes());
    out.extend((cd.len() as u32).to_le_bytes());
    out.extend((cd_off as u32).to_le_bytes());
    out.extend([0; 2]);
    out
}

#[test]
fn reads_nested_tensors_from_a_torch_zip() {
    let t = vec![
        (
            "a.weight".to_string(),
            vec![2, 3],
            (0..6).map(|v| v as f32).collect(),
        ),
        ("b".to_string(), vec![4], vec![0.5, -1.0, 2.0, 3.5]),
    ];
    let bytes = write_pth("teacher", &t);
    let named = read_bytes(&bytes).unwrap();
    assert_eq!(named.len(), 2);
    assert_eq!(
        named["teacher.a.weight"],
        (vec![2, 3], vec![0., 1., 2., 3., 4., 5.])
    );
    assert_eq!(named["teacher.b"].1, vec![0.5, -1.0, 2.0, 3.5]);
}

#[test]
fn reads_a_file_written_by_cpythons_pickler() {
    // tests/fixtures/torchlike.pth: the torch.save format built with CPython's Pickler
    // and zipfile (tests/fixtures/make_torchlike_pth.py): BINGET/BINPUT, TUPLE1/2,
    // NEWOBJ + BUILD (an argparse.Namespace), APPENDS, BINFLOAT, an int64 storage.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torchlike.pth");
    let named = read(Path::new(path)).unwrap();
    let keys: Vec<&str> = named.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "teacher.module.backbone.h",
            "teacher.module.backbone.w",
            "teacher.module.backbone.wt"
        ]
    );
    let w = &named["teacher.module.backbone.w"];
    assert_eq!(w, &(vec![2, 3], vec![0., 1., 2., 3., 4., 5.]));
    let wt = &named["teacher.module.backbone.wt"];
    assert_eq!(wt, &(vec![3, 2], vec![0., 3., 1., 4., 2., 5.]));
    assert_eq!(named["teacher.module.backbone.h"].1, [-2.0, 1.0, 3.0]);
}

#[test]
fn damaged_files_are_errors_not_panics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torchlike.pth");
    let good = std::fs::read(path).unwrap();
    for cut in 0..good.len() {
        let _ = read_bytes(&good[..cut]);
    }
    for i in 0..good.len() {
        for v in [0x00, 0xff, 0x7f] {
            let mut bad = good.clone();
            bad[i] = v;
            let _ = read_bytes(&bad);
        }
    }
}

#[test]
fn strided_views_half_floats_and_bad_input() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    // A transposed view: shape [3, 2], stride [1, 3] over storage 0..6, offset 1 on
    // a storage of 7.
    let t = TensorRef {
        storage: "0".into(),
        dtype: "FloatStorage".into(),
        offset: 1,
        shape: vec![3, 2],
        stride: vec![1, 3],
    };
    let storage: Vec<u8> = (0..7)
        .flat_map(|v| (v as f32 - 1.0).to_le_bytes())
        .collect();
    let (esize, conv) = element("FloatStorage").unwrap();
    assert_eq!(
        gather(&t, &storage, esize, conv).unwrap(),
        [0., 3., 1., 4., 2., 5.]
    );
    let short = &storage[..20];
    assert!(gather(&t, short, esize, conv).is_err());
    assert!(element("LongStorage").is_err());
    let e = read_bytes(b"not a zip at all").unwrap_err().to_string();
    assert!(e.contains("not a zip"), "{e}");
    let e = unpickle(&[0x80, 2, 0xff]).unwrap_err().to_string();
    assert!(e.contains("unsupported pickle opcode 0xff"), "{e}");
}
