//! What a `model.pt2` (an AOTInductor package) must show before it is loaded. libtorch's
//! loader checks none of this: a package compiled for an instruction set the host lacks
//! dies on an illegal instruction, one for another device type or torch release fails in
//! ways that do not say why. The package's own metadata (read without loading it) says
//! what it was built for; anything this server cannot run fails the version with a message
//! naming the mismatch, and the version before keeps serving.

use crate::runtime::Device;
use crate::signature::{SignatureMap, TensorSpec};
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::RangeInclusive;
use std::path::Path;

/// Metadata keys the export command (tools/modelgate_export.py) writes.
pub const SIGNATURE_KEY: &str = "modelgate.signature";
const BATCH_MIN_KEY: &str = "modelgate.batch_min";
const BATCH_MAX_KEY: &str = "modelgate.batch_max";
const TORCH_VERSION_KEY: &str = "modelgate.torch_version";
const CPU_FLAGS_KEY: &str = "modelgate.cpu_flags";

/// What the package's metadata tells the loader once it passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageFacts {
    /// The signature JSON the export recorded, if any.
    pub signature: Option<String>,
    /// The batch sizes the export allows (`None`: not recorded; nothing is bounded).
    pub batch_range: Option<RangeInclusive<usize>>,
    /// A note for the log when the package was built by an older torch.
    pub warning: Option<String>,
}

/// What this server is, for comparing with a package: its devices, CPU and torch.
#[derive(Clone, Debug)]
pub struct Host {
    pub devices: Vec<Device>,
    /// `std::env::consts::ARCH`.
    pub arch: String,
    /// The CPU's feature flags (`/proc/cpuinfo`'s `flags` or `Features`).
    pub cpu_flags: Vec<String>,
    /// libtorch's `MAJOR.MINOR`.
    pub torch: String,
}

impl Host {
    /// This process's host, serving on `devices`.
    pub fn this(devices: &[Device]) -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_flags = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                matches!(key.trim(), "flags" | "Features").then_some(value)
            })
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Host {
            devices: devices.to_vec(),
            arch: std::env::consts::ARCH.to_string(),
            cpu_flags,
            torch: crate::runtime::torch_version(),
        }
    }
}

/// The CPU flags each `AOTI_CPU_ISA` word (PyTorch's `pick_vec_isa`, upper-cased) compiles
/// against: its `-m` flags, as `/proc/cpuinfo` names them.
fn isa_flags(word: &str) -> Option<&'static [&'static str]> {
    Some(match word {
        "INVALID_VEC_ISA" => &[],
        "AVX2" => &["avx2", "fma", "f16c"],
        "AVX512" => &["avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"],
        "AVX512_VNNI" => &["avx512_vnni"],
        "AMX_TILE" => &["amx_tile", "amx_bf16", "amx_int8"],
        "NEON" | "ASIMD" => &["asimd"],
        _ => return None,
    })
}

/// Whether a `/proc/cpuinfo` flag of an `arch` CPU names instructions a compiler may emit
/// for `-march=native` (as opposed to a property of the machine: `hypervisor`,
/// `constant_tsc`, ... which differ between hosts that run the same code). On ARM every
/// `Features` word is an instruction set extension.
fn is_instruction_set(arch: &str, flag: &str) -> bool {
    const X86_PREFIXES: &[&str] = &[
        "sse",
        "ssse3",
        "avx",
        "amx",
        "fma",
        "f16c",
        "bmi",
        "sha",
        "aes",
        "vaes",
        "pclmulqdq",
        "vpclmulqdq",
        "gfni",
        "adx",
        "abm",
        "popcnt",
        "movbe",
        "xop",
        "tbm",
        "3dnowprefetch",
        "rdrand",
        "rdseed",
        "clflushopt",
        "clwb",
        "movdir",
        "serialize",
        "waitpkg",
        "cldemote",
        "fsgsbase",
        "xsave",
    ];
    match arch {
        "x86_64" | "x86" => X86_PREFIXES.iter().any(|prefix| flag.starts_with(prefix)),
        _ => true,
    }
}

/// Checks `metadata` against `host` and returns what the loader needs from it.
pub fn check(metadata: &BTreeMap<String, String>, host: &Host) -> Result<PackageFacts, String> {
    let field = |key: &str| {
        metadata
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };

    let wanted = host.devices.first().map_or("cpu", |device| match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
    });
    match field("AOTI_DEVICE_KEY") {
        None => return Err("the package's metadata names no device (AOTI_DEVICE_KEY)".into()),
        Some(key) if key != wanted => {
            return Err(format!(
                "the package was compiled for device '{key}' but this server runs models on \
                 {wanted} (--device); compile it with its inputs on {wanted}"
            ))
        }
        Some(_) => {}
    }
    if let Some(machine) = field("AOTI_MACHINE") {
        if machine != host.arch {
            return Err(format!(
                "the package was compiled for {machine} CPUs and this host is {}",
                host.arch
            ));
        }
    }
    if let Some(isa) = field("AOTI_CPU_ISA") {
        for word in isa.split_whitespace() {
            let Some(flags) = isa_flags(word) else {
                return Err(format!(
                    "the package was compiled for the CPU instruction set '{word}', which \
                     modelgate cannot check against this host; refused rather than risk an \
                     illegal instruction"
                ));
            };
            let missing: Vec<&str> = flags
                .iter()
                .copied()
                .filter(|flag| !host.cpu_flags.iter().any(|have| have == flag))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "the package was compiled for CPU instruction set {isa} (AOTI_CPU_ISA) and \
                     this CPU lacks {}: running it would be an illegal instruction; compile it \
                     on a machine of this kind",
                    missing.join(", ")
                ));
            }
        }
    }
    if let Some(flags) = field(CPU_FLAGS_KEY) {
        let missing: Vec<&str> = flags
            .split_whitespace()
            .filter(|flag| is_instruction_set(&host.arch, flag))
            .filter(|flag| !host.cpu_flags.iter().any(|have| have == flag))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the package was compiled on a CPU with {} ({CPU_FLAGS_KEY}) and this CPU \
                 lacks them: AOTInductor compiles for the compiling CPU (-march=native), so \
                 running it here could be an illegal instruction; compile it on a machine \
                 of this kind",
                missing.join(", ")
            ));
        }
    }
    let mut warning = None;
    if let Some(built) = field(TORCH_VERSION_KEY) {
        match compare_releases(built, &host.torch) {
            Some(std::cmp::Ordering::Greater) => {
                return Err(format!(
                    "the package was compiled by torch {built}, newer than this server's \
                     libtorch {}; AOTInductor packages run on the release that built them or \
                     a later one",
                    host.torch
                ))
            }
            Some(std::cmp::Ordering::Less) => {
                warning = Some(format!(
                    "the package was compiled by torch {built} and runs on libtorch {}",
                    host.torch
                ))
            }
            _ => {}
        }
    }
    let batch_range = match (field(BATCH_MIN_KEY), field(BATCH_MAX_KEY)) {
        (None, None) => None,
        (Some(low), Some(high)) => match (low.parse::<usize>(), high.parse::<usize>()) {
            (Ok(low), Ok(high)) if 1 <= low && low <= high => Some(low..=high),
            _ => {
                return Err(format!(
                    "the package's batch range {BATCH_MIN_KEY}={low}, {BATCH_MAX_KEY}={high} \
                     is not 1 <= min <= max"
                ))
            }
        },
        _ => {
            return Err(format!(
                "the package's metadata has only one of {BATCH_MIN_KEY} and {BATCH_MAX_KEY}"
            ))
        }
    };
    Ok(PackageFacts {
        signature: field(SIGNATURE_KEY).map(str::to_string),
        batch_range,
        warning,
    })
}

/// Checks the signatures a `signature.json` gives a package against the signature its
/// export recorded. The package checks nothing it is given, so a `signature.json` that
/// allows what the compiled code does not (another dtype, a free dimension the export
/// fixed, inputs in another order) would let requests read past their tensors. Names may
/// differ (they are the server's to choose); count, order, dtypes, ranks and fixed
/// dimensions may not, though a dimension the export left free may be fixed here.
pub fn check_signatures_match(given: &SignatureMap, recorded: &SignatureMap) -> Result<(), String> {
    let Some(exported) = recorded.signatures.values().next() else {
        return Ok(());
    };
    for (name, signature) in &given.signatures {
        for (what, given, exported) in [
            ("inputs", &signature.inputs, &exported.inputs),
            ("outputs", &signature.outputs, &exported.outputs),
        ] {
            if given.len() != exported.len() {
                return Err(format!(
                    "signature '{name}' lists {} {what} but the package's forward has {}",
                    given.len(),
                    exported.len()
                ));
            }
            for (index, (spec, compiled)) in given.iter().zip(exported).enumerate() {
                spec_matches(spec, compiled).map_err(|why| {
                    format!(
                        "signature '{name}': {what} {index} ('{}') {why} (the export recorded \
                         '{}' as {} {})",
                        spec.name,
                        compiled.name,
                        compiled.dtype,
                        show_shape(compiled.shape.as_deref()),
                    )
                })?;
            }
        }
    }
    Ok(())
}

fn spec_matches(spec: &TensorSpec, compiled: &TensorSpec) -> Result<(), String> {
    if spec.dtype != compiled.dtype {
        return Err(format!("is {} in signature.json", spec.dtype));
    }
    let (Some(shape), Some(exported)) = (&spec.shape, &compiled.shape) else {
        return Ok(());
    };
    if shape.len() != exported.len() {
        return Err(format!("has rank {} in signature.json", shape.len()));
    }
    for (axis, (&dim, &fixed)) in shape.iter().zip(exported).enumerate() {
        if fixed >= 0 && dim != fixed {
            return Err(format!(
                "has {dim} at dimension {axis} in signature.json where the package takes \
                 only {fixed}"
            ));
        }
    }
    Ok(())
}

fn show_shape(shape: Option<&[i64]>) -> String {
    shape.map_or_else(|| "of any shape".to_string(), |dims| format!("{dims:?}"))
}

/// Checks the compiled libraries inside the package before the loader maps them: a `.so`
/// cut short (an upload that stopped, a bad copy) whose headers point past its end kills
/// the process with SIGBUS when it is mapped, and one for another machine cannot load.
/// Reads each library's ELF headers only, against the size the zip records for it (which
/// the loader's extraction insists on).
pub fn check_libraries(package: &Path, arch: &str) -> Result<(), String> {
    let file = std::fs::File::open(package).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| format!("not a zip archive: {e}"))?;
    let libraries: Vec<String> = archive
        .file_names()
        .filter_map(Result::ok)
        .filter(|name| name.ends_with(".so"))
        .map(|name| name.into_owned())
        .collect();
    if libraries.is_empty() {
        // libtorch would compile the package's C++ sources at load, with a command line
        // taken from the package: a server runs compiled code only.
        return Err("it holds no compiled library (.so); compile it with \
                    torch._inductor.aoti_compile_and_package"
            .into());
    }
    for name in libraries {
        let mut entry = archive.by_name(&name).map_err(|e| format!("{name}: {e}"))?;
        let size = entry.size();
        let mut headers = Vec::new();
        (&mut entry)
            .take(ELF_HEADERS_READ)
            .read_to_end(&mut headers)
            .map_err(|e| format!("{name}: {e}"))?;
        check_elf(&headers, size, arch).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// How much of a library is read for its headers (the ELF header and, where linkers put
/// them, the program headers right after it).
const ELF_HEADERS_READ: u64 = 64 * 1024;

/// Checks a 64-bit little-endian ELF file of `size` bytes from its first bytes `head`:
/// its machine is `arch`'s, and every table and segment it declares lies within `size`.
fn check_elf(head: &[u8], size: u64, arch: &str) -> Result<(), String> {
    let field = |at: usize, width: usize| -> Result<u64, String> {
        let bytes = head
            .get(at..at + width)
            .ok_or_else(|| format!("cut short: {size} bytes, not a whole ELF header"))?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |value, &byte| (value << 8) | u64::from(byte)))
    };
    if head.get(..4) != Some(b"\x7fELF") || head.get(4) != Some(&2) || head.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF library".into());
    }
    let machine = field(0x12, 2)?;
    let expected = match arch {
        "x86_64" => Some(62),
        "aarch64" => Some(183),
        _ => None,
    };
    if expected.is_some_and(|expected| expected != machine) {
        return Err(format!(
            "compiled for ELF machine {machine}, not this {arch} host"
        ));
    }
    let past_end = |what: &str, end: Option<u64>| match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(format!(
            "cut short: its {what} reaches past its {size} bytes (loading it would crash the \
             process)"
        )),
    };
    let (phoff, shoff) = (field(0x20, 8)?, field(0x28, 8)?);
    let (phentsize, phnum) = (field(0x36, 2)?, field(0x38, 2)?);
    let (shentsize, shnum) = (field(0x3a, 2)?, field(0x3c, 2)?);
    past_end(
        "section header table",
        shentsize
            .checked_mul(shnum)
            .and_then(|n| n.checked_add(shoff)),
    )?;
    past_end(
        "program header table",
        phentsize
            .checked_mul(phnum)
            .and_then(|n| n.checked_add(phoff)),
    )?;
    for index in 0..phnum {
        let at = phoff + index * phentsize;
        let at = usize::try_from(at).map_err(|_| "program header offset".to_string())?;
        let (offset, file_size) = (field(at + 0x08, 8)?, field(at + 0x20, 8)?);
        past_end(&format!("segment {index}"), offset.checked_add(file_size))?;
    }
    Ok(())
}

/// Compares two releases by `MAJOR.MINOR` (`2.11.0+cu130` is 2.11); `None` when either
/// cannot be read.
fn compare_releases(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let release = |text: &str| -> Option<(u32, u32)> {
        let mut parts = text.split(['.', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    Some(release(a)?.cmp(&release(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signatures(inputs: &str, outputs: &str) -> SignatureMap {
        SignatureMap::from_json(&format!(
            r#"{{"signatures": {{"serving_default": {{"method": "forward",
                "inputs": [{inputs}], "outputs": [{outputs}]}}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_signature_json_must_allow_no_more_than_the_package_was_compiled_for() {
        let x = r#"{"name": "x", "dtype": "DT_FLOAT", "shape": [-1, 4]}"#;
        let y = r#"{"name": "y", "dtype": "DT_FLOAT", "shape": [-1, 3]}"#;
        let recorded = signatures(x, y);
        // Renamed, or a free batch fixed: fine.
        let renamed = signatures(
            r#"{"name": "features", "dtype": "DT_FLOAT", "shape": [8, 4]}"#,
            r#"{"name": "scores", "dtype": "DT_FLOAT"}"#,
        );
        assert_eq!(check_signatures_match(&renamed, &recorded), Ok(()));
        let refused = |given: SignatureMap| check_signatures_match(&given, &recorded).unwrap_err();
        let free = refused(signatures(
            r#"{"name": "x", "dtype": "DT_FLOAT", "shape": [-1, -1]}"#,
            y,
        ));
        assert!(
            free.contains("inputs 0 ('x') has -1 at dimension 1"),
            "{free}"
        );
        let dtype = refused(signatures(
            r#"{"name": "x", "dtype": "DT_DOUBLE", "shape": [-1, 4]}"#,
            y,
        ));
        assert!(dtype.contains("is DT_DOUBLE in signature.json"), "{dtype}");
        let rank = refused(signatures(
            r#"{"name": "x", "dtype": "DT_FLOAT", "shape": [-1, 2, 2]}"#,
            y,
        ));
        assert!(rank.contains("rank 3"), "{rank}");
        let z = r#"{"name": "z", "dtype": "DT_FLOAT", "shape": [-1, 4]}"#;
        let count = refused(signatures(&format!("{x}, {z}"), y));
        assert!(
            count.contains("lists 2 inputs but the package's forward has 1"),
            "{count}"
        );
        let outputs = refused(signatures(
            x,
            &format!("{y}, {}", y.replace("\"y\"", "\"w\"")),
        ));
        assert!(outputs.contains("2 outputs"), "{outputs}");
    }

    fn host() -> Host {
        Host {
            devices: vec![Device::Cpu],
            arch: "x86_64".into(),
            cpu_flags: [
                "fma", "f16c", "avx2", "avx512f", "avx512dq", "avx512vl", "avx512bw",
            ]
            .map(String::from)
            .to_vec(),
            torch: "2.11".into(),
        }
    }

    fn metadata(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut all: BTreeMap<String, String> = [
            ("AOTI_DEVICE_KEY", "cpu"),
            ("AOTI_MACHINE", "x86_64"),
            ("AOTI_CPU_ISA", "AVX512"),
            ("modelgate.torch_version", "2.11.0+cu130"),
            ("modelgate.batch_min", "1"),
            ("modelgate.batch_max", "64"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (key, value) in entries {
            all.insert(key.to_string(), value.to_string());
        }
        all
    }

    #[test]
    fn a_package_for_this_host_passes_with_its_batch_range() {
        let facts = check(&metadata(&[]), &host()).unwrap();
        assert_eq!(facts.batch_range, Some(1..=64));
        assert_eq!(facts.signature, None);
        assert_eq!(facts.warning, None);
    }

    #[test]
    fn what_this_host_cannot_run_is_refused_naming_why() {
        for (entries, needle) in [
            (
                vec![("AOTI_DEVICE_KEY", "cuda")],
                "compiled for device 'cuda'",
            ),
            (vec![("AOTI_DEVICE_KEY", "")], "names no device"),
            (vec![("AOTI_MACHINE", "aarch64")], "aarch64"),
            (
                vec![("AOTI_CPU_ISA", "AVX512 AVX512_VNNI")],
                "lacks avx512_vnni",
            ),
            (vec![("AOTI_CPU_ISA", "SOMETHING_NEW")], "'SOMETHING_NEW'"),
            (vec![("modelgate.torch_version", "2.12.1")], "newer than"),
            (vec![("modelgate.batch_min", "0")], "1 <= min <= max"),
            (vec![("modelgate.batch_max", "x")], "1 <= min <= max"),
        ] {
            let error = check(&metadata(&entries), &host()).unwrap_err();
            assert!(error.contains(needle), "{error} should say {needle}");
        }
        let mut gpu = host();
        gpu.devices = vec![Device::Cuda(0)];
        let error = check(&metadata(&[]), &gpu).unwrap_err();
        assert!(error.contains("runs models on cuda"), "{error}");
    }

    /// An ELF header with one program header right after it, for a file of `size` bytes.
    fn elf(machine: u16, segment_end: u64, section_table: u64) -> Vec<u8> {
        let mut head = vec![0u8; 64 + 56];
        head[..6].copy_from_slice(b"\x7fELF\x02\x01");
        head[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        head[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        head[0x28..0x30].copy_from_slice(&section_table.to_le_bytes());
        head[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        head[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        head[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        head[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        head[64 + 0x20..64 + 0x28].copy_from_slice(&segment_end.to_le_bytes());
        head
    }

    #[test]
    fn libraries_cut_short_or_for_another_machine_are_refused() {
        assert_eq!(check_elf(&elf(62, 1000, 700), 1000, "x86_64"), Ok(()));
        let cut = check_elf(&elf(62, 1000, 700), 600, "x86_64").unwrap_err();
        assert!(cut.contains("cut short"), "{cut}");
        let segment = check_elf(&elf(62, 5000, 100), 1000, "x86_64").unwrap_err();
        assert!(segment.contains("segment 0"), "{segment}");
        let arm = check_elf(&elf(183, 1000, 700), 1000, "x86_64").unwrap_err();
        assert!(arm.contains("machine 183"), "{arm}");
        assert!(check_elf(b"#!/bin/sh", 9, "x86_64").is_err());
        assert!(check_elf(&elf(62, 1000, 700)[..30], 1000, "x86_64").is_err());
        let huge = check_elf(&elf(62, u64::MAX, 700), 1000, "x86_64").unwrap_err();
        assert!(huge.contains("segment 0"), "{huge}");
    }

    #[test]
    fn a_package_needs_every_instruction_set_of_the_cpu_that_compiled_it() {
        let built_here = metadata(&[("modelgate.cpu_flags", "fpu hypervisor fma avx2 f16c")]);
        // A machine property the host lacks ('hypervisor') is no reason to refuse.
        assert!(check(&built_here, &host()).is_ok());
        let richer = metadata(&[(
            "modelgate.cpu_flags",
            "avx2 avx512f avx512_bf16 gfni constant_tsc",
        )]);
        let refused = check(&richer, &host()).unwrap_err();
        assert!(refused.contains("avx512_bf16, gfni"), "{refused}");
        assert!(!refused.contains("constant_tsc"), "{refused}");
        let mut arm = host();
        arm.arch = "aarch64".into();
        arm.cpu_flags = vec!["asimd".into(), "fp".into()];
        let mut sve = metadata(&[("modelgate.cpu_flags", "fp asimd sve")]);
        sve.insert("AOTI_MACHINE".into(), "aarch64".into());
        sve.remove("AOTI_CPU_ISA");
        let refused = check(&sve, &arm).unwrap_err();
        assert!(refused.contains("with sve"), "{refused}");
    }

    #[test]
    fn an_older_torch_is_a_warning_and_no_version_is_none() {
        let facts = check(&metadata(&[("modelgate.torch_version", "2.9.1")]), &host()).unwrap();
        assert!(facts.warning.unwrap().contains("2.9.1"));
        let mut bare = metadata(&[]);
        bare.retain(|key, _| key.starts_with("AOTI_"));
        let facts = check(&bare, &host()).unwrap();
        assert_eq!((facts.batch_range, facts.warning), (None, None));
        assert_eq!(
            check(&metadata(&[("AOTI_CPU_ISA", "INVALID_VEC_ISA")]), &host()).map(|_| ()),
            Ok(())
        );
    }
}
