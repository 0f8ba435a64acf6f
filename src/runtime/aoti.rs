//! AOTInductor packages (`model.pt2`): PyTorch 2's compiled models, loaded and run through
//! libtorch's `AOTIModelPackageLoader` (see `aoti_shim.cpp`), no Python involved.
//!
//! Two things the loader does not do, done here:
//! - It unpacks a package into a fresh `/tmp/XXXXXX` (TMPDIR is ignored) and removes it
//!   when the loaded package is freed, but leaves it behind when loading throws, and a
//!   process that is killed leaves every one behind. This binary's [`mkdtemp`] notes the
//!   directory each load makes (other servers on the host unpack into the same /tmp), and
//!   loads run one at a time (the loader also parses JSON through a function-level
//!   static). A load's directory is removed after a failure, and right after a CPU package
//!   loaded (its library stays mapped and its constants are in memory; nothing is read
//!   from there again). A
//!   CUDA package keeps its directory while it is loaded: its kernels load lazily from it.
//!   Every directory a load makes is marked with its owner (pid and start time) as it is
//!   made, and a server starting removes the marked directories of owners that are gone
//!   ([`remove_stale_unpack_dirs`]): a server killed while it held CUDA packages, or in
//!   the middle of any load.
//! - It checks nothing about the inputs it is given; the layers above check them against
//!   the signature, and [`Package::run`] against the batch range the export allows.

use super::{classify_torch_error, Device, RunError};
use std::collections::{BTreeMap, HashSet};
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

#[repr(C)]
struct RawPackage {
    _private: [u8; 0],
}

extern "C" {
    fn modelgate_aoti_torch_version() -> *const c_char;
    fn modelgate_aoti_metadata(
        path: *const c_char,
        entries: *mut *mut c_char,
        length: *mut usize,
    ) -> *mut c_char;
    fn modelgate_aoti_load(
        path: *const c_char,
        runners: usize,
        device_index: c_int,
        loaded: *mut *mut RawPackage,
        bytes: *mut usize,
    ) -> *mut c_char;
    fn modelgate_aoti_run(
        package: *mut RawPackage,
        inputs: *const *const torch_sys::C_tensor,
        count: usize,
        cuda_index: c_int,
        outputs: *mut *mut *mut torch_sys::C_tensor,
        output_count: *mut usize,
    ) -> *mut c_char;
    fn modelgate_aoti_free(package: *mut RawPackage);
    fn modelgate_aoti_free_buffer(buffer: *mut std::ffi::c_void);
}

/// Where the loader unpacks packages; hard-coded in libtorch.
const UNPACK_ROOT: &str = "/tmp";

/// Loads (and metadata reads) one at a time, so that what appears in /tmp during one is
/// that one's.
static LOADING: Mutex<()> = Mutex::new(());

/// Frees a buffer or message a shim malloc'd (every shim allocates with malloc).
///
/// # Safety
/// `buffer` is null or came from a shim's malloc and is not used again.
pub(super) unsafe fn free_buffer(buffer: *mut std::ffi::c_void) {
    modelgate_aoti_free_buffer(buffer)
}

/// A shim's error message, if it returned one, freed after reading.
pub(super) fn take_message(message: *mut c_char) -> Option<String> {
    if message.is_null() {
        return None;
    }
    // SAFETY: a non-null answer is a NUL-terminated string the shim malloc'd for us; it is
    // read once and freed once, by the shim's own free.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { modelgate_aoti_free_buffer(message.cast()) };
    Some(text)
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte in its path", path.display()))
}

/// The libtorch version modelgate runs, as `MAJOR.MINOR`.
pub fn torch_version() -> String {
    // SAFETY: the shim returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(modelgate_aoti_torch_version()) }
        .to_string_lossy()
        .into_owned()
}

/// The package's metadata (`AOTI_DEVICE_KEY`, `AOTI_CPU_ISA`, what the export wrote) without
/// loading its model.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let c_path = c_path(path)?;
    let mut entries: *mut c_char = std::ptr::null_mut();
    let mut length = 0usize;
    let message = unpacking(false, || {
        // SAFETY: the shim reads the path and writes the two out-parameters on success.
        take_message(unsafe { modelgate_aoti_metadata(c_path.as_ptr(), &mut entries, &mut length) })
    });
    if let Some(message) = message {
        return Err(super::trim_torch_message(&message));
    }
    // SAFETY: on success `entries` is a malloc'd buffer of `length` bytes, freed below.
    let packed = unsafe { std::slice::from_raw_parts(entries.cast::<u8>(), length) }.to_vec();
    unsafe { modelgate_aoti_free_buffer(entries.cast()) };
    let mut fields = packed.split(|&b| b == 0);
    let mut metadata = BTreeMap::new();
    while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
        metadata.insert(
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
    }
    Ok(metadata)
}

/// A loaded package. `run` may be called from many threads at once: each call takes one of
/// the package's runners, waiting when all are busy.
pub struct Package {
    raw: NonNull<RawPackage>,
    device: Device,
    /// The bytes of its constants (weights and buffers), shared by its runners.
    constant_bytes: u64,
}

// SAFETY: AOTIModelPackageLoader::run is safe to call concurrently when the loader is not
// single-threaded (modelgate never asks for that): its container hands each call a free
// model instance under its own lock. Freeing happens once, in Drop.
unsafe impl Send for Package {}
unsafe impl Sync for Package {}

impl Package {
    /// Loads the package at `path` for `device`, with `runners` model instances (the number
    /// of threads that will call it at once).
    pub fn load(path: &Path, device: Device, runners: usize) -> Result<Package, String> {
        let c_path = c_path(path)?;
        let device_index = match device {
            Device::Cpu => -1,
            Device::Cuda(n) => c_int::try_from(n).map_err(|_| format!("no CUDA device {n}"))?,
        };
        let mut raw: *mut RawPackage = std::ptr::null_mut();
        let mut bytes = 0usize;
        let keep_unpacked = device != Device::Cpu;
        let message = unpacking(keep_unpacked, || {
            // SAFETY: the shim reads the path and sets `raw` and `bytes` on success only.
            take_message(unsafe {
                modelgate_aoti_load(
                    c_path.as_ptr(),
                    runners.max(1),
                    device_index,
                    &mut raw,
                    &mut bytes,
                )
            })
        });
        if let Some(message) = message {
            return Err(super::trim_torch_message(&message));
        }
        let raw = NonNull::new(raw).ok_or("the AOTInductor loader returned nothing")?;
        Ok(Package {
            raw,
            device,
            constant_bytes: bytes as u64,
        })
    }

    /// The bytes of the package's constants (weights and buffers).
    pub fn constant_bytes(&self) -> u64 {
        self.constant_bytes
    }

    /// Runs the package on `inputs` (on its device), returning its flattened outputs.
    pub fn run(&self, inputs: &[tch::Tensor]) -> Result<Vec<tch::Tensor>, RunError> {
        let pointers: Vec<*const torch_sys::C_tensor> =
            inputs.iter().map(tch::Tensor::as_ptr).collect();
        let cuda_index = match self.device {
            Device::Cpu => -1,
            Device::Cuda(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
        };
        let mut outputs: *mut *mut torch_sys::C_tensor = std::ptr::null_mut();
        let mut count = 0usize;
        // SAFETY: the inputs are live tch tensors (at::Tensor pointers) borrowed for the
        // call; on success the shim hands over an array of `count` owned tensors.
        let message = take_message(unsafe {
            modelgate_aoti_run(
                self.raw.as_ptr(),
                pointers.as_ptr(),
                pointers.len(),
                cuda_index,
                &mut outputs,
                &mut count,
            )
        });
        if let Some(message) = message {
            return Err(classify_torch_error(&message));
        }
        // SAFETY: each pointer is a `new at::Tensor` that tch now owns (and frees), taken
        // once; the array itself is freed by the shim's free.
        let tensors = unsafe { std::slice::from_raw_parts(outputs, count) }
            .iter()
            .map(|&tensor| unsafe { tch::Tensor::from_ptr(tensor) })
            .collect();
        unsafe { modelgate_aoti_free_buffer(outputs.cast()) };
        Ok(tensors)
    }
}

impl Drop for Package {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim's load and is freed once; the loader's destructor
        // removes the directory the package was unpacked into.
        unsafe { modelgate_aoti_free(self.raw.as_ptr()) };
    }
}

/// Runs `unpack` (a load or a metadata read that answers `Some(message)` when it failed)
/// alone, then removes the directories it made in /tmp: always after a failure, and after
/// a success unless `keep_on_success` (then they are marked as this process's).
fn unpacking(keep_on_success: bool, unpack: impl FnOnce() -> Option<String>) -> Option<String> {
    let _alone = LOADING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    MADE_HERE.with(|made| *made.borrow_mut() = Some(Vec::new()));
    let failed = unpack();
    let made = MADE_HERE
        .with(|made| made.borrow_mut().take())
        .unwrap_or_default();
    let remove = failed.is_some() || !keep_on_success;
    // Only what this thread's mkdtemp made: another process's unpacking, in the same /tmp
    // at the same moment, is never touched.
    for left in made.iter().filter(|dir| dir.is_dir()) {
        let done = if remove {
            std::fs::remove_dir_all(left)
        } else {
            std::fs::write(left.join(OWNER_MARK), Owner::this_process().to_string())
        };
        if let Err(e) = done {
            tracing::warn!(dir = %left.display(), remove, "cannot tidy what a package load unpacked: {e}");
        }
    }
    failed
}

thread_local! {
    /// The directories `mkdtemp` made on this thread while it runs [`unpacking`] (`None`
    /// outside it).
    static MADE_HERE: std::cell::RefCell<Option<Vec<PathBuf>>> =
        const { std::cell::RefCell::new(None) };
}

/// libc's `mkdtemp`, wrapped to note what it makes during [`unpacking`]. libtorch's
/// package loader makes its unpack directory with `mkdtemp("/tmp/XXXXXX")`; this
/// definition, in the executable, is the one the dynamic linker binds libtorch's call to,
/// so a load's directory is known exactly rather than guessed from what appeared in /tmp
/// (where other servers on the host unpack too).
///
/// # Safety
/// As libc's: `template` is a writable NUL-terminated string ending in `XXXXXX`.
#[no_mangle]
pub unsafe extern "C" fn mkdtemp(template: *mut c_char) -> *mut c_char {
    type Mkdtemp = unsafe extern "C" fn(*mut c_char) -> *mut c_char;
    static LIBC_MKDTEMP: std::sync::OnceLock<Option<Mkdtemp>> = std::sync::OnceLock::new();
    let libc_mkdtemp = LIBC_MKDTEMP.get_or_init(|| {
        // SAFETY: dlsym with a static NUL-terminated name; RTLD_NEXT finds the definition
        // after this one (libc's), whose type is mkdtemp's.
        let symbol = unsafe { libc::dlsym(libc::RTLD_NEXT, c"mkdtemp".as_ptr()) };
        (!symbol.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut std::ffi::c_void, Mkdtemp>(symbol) })
    });
    let Some(libc_mkdtemp) = libc_mkdtemp else {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's template, as libc's mkdtemp takes it.
    let made = unsafe { libc_mkdtemp(template) };
    if !made.is_null() {
        // SAFETY: on success mkdtemp answers the template, a NUL-terminated path.
        let path = PathBuf::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
                unsafe { CStr::from_ptr(made) }.to_bytes(),
            ),
        );
        let noted = MADE_HERE
            .try_with(|noted| {
                noted
                    .borrow_mut()
                    .as_mut()
                    .map(|noted| noted.push(path.clone()))
                    .is_some()
            })
            .unwrap_or(false);
        if noted {
            // Marked before anything is unpacked into it: should this process die in the
            // middle of the load, the next server to start knows the directory for its.
            let _ = std::fs::write(path.join(OWNER_MARK), Owner::this_process().to_string());
        }
    }
    made
}

/// The file in a kept unpack directory that names the process holding it.
const OWNER_MARK: &str = ".modelgate-owner";

/// A process, told apart from a later one that reuses its pid by its start time (clock
/// ticks after boot, field 22 of /proc/PID/stat).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    pid: u32,
    started: u64,
}

impl Owner {
    fn this_process() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            started: Owner::start_time(pid).unwrap_or(0),
        }
    }

    fn start_time(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count after its end.
        let after_name = &stat[stat.rfind(')')? + 1..];
        after_name.split_whitespace().nth(19)?.parse().ok()
    }

    fn parse(text: &str) -> Option<Owner> {
        let (pid, started) = text.trim().split_once(' ')?;
        Some(Owner {
            pid: pid.parse().ok()?,
            started: started.parse().ok()?,
        })
    }

    fn is_alive(self) -> bool {
        Owner::start_time(self.pid) == Some(self.started)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.pid, self.started)
    }
}

/// Removes the unpack directories that modelgate processes no longer running left in /tmp
/// (a server killed while it held CUDA packages, or in the middle of a load), and answers
/// how many. Directories of running servers, and any without our mark, are left alone.
pub fn remove_stale_unpack_dirs() -> usize {
    let _alone = LOADING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut removed = 0;
    for dir in unpack_dirs() {
        let owner = std::fs::read_to_string(dir.join(OWNER_MARK))
            .ok()
            .and_then(|text| Owner::parse(&text));
        let Some(owner) = owner else { continue };
        if owner.is_alive() {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), %owner, "cannot remove a stale package directory: {e}")
            }
        }
    }
    removed
}

/// The directories in /tmp named as mkdtemp("/tmp/XXXXXX") names them.
fn unpack_dirs() -> HashSet<PathBuf> {
    let Ok(entries) = std::fs::read_dir(UNPACK_ROOT) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.as_encoded_bytes();
            name.len() == 6
                && name.iter().all(u8::is_ascii_alphanumeric)
                && entry.file_type().is_ok_and(|kind| kind.is_dir())
        })
        .map(|entry| entry.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `dir` is what the loader unpacks: `data/aotinductor` at its top or one level
    /// down (under the archive's own prefix folder), so that no other program's new temporary
    /// directory is touched.
    fn holds_a_package(dir: &Path) -> bool {
        let unpacked = |root: &Path| root.join("data").join("aotinductor").is_dir();
        unpacked(dir)
            || std::fs::read_dir(dir)
                .is_ok_and(|entries| entries.flatten().any(|entry| unpacked(&entry.path())))
    }

    /// The tests below watch or fill /tmp; run one at a time so that none sees another's
    /// directories as its own (the test harness runs tests on parallel threads).
    static TMP: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn tmp_to_myself() -> std::sync::MutexGuard<'static, ()> {
        TMP.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[test]
    fn a_file_that_is_not_a_package_is_an_error_and_leaves_nothing() {
        let _tmp = tmp_to_myself();
        let dir = std::env::temp_dir().join(format!("modelgate-aoti-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.pt2");
        std::fs::write(&path, b"not a zip at all").unwrap();
        let before = unpack_dirs();
        assert!(read_metadata(&path).is_err());
        let error = Package::load(&path, Device::Cpu, 1).err().unwrap();
        assert!(!error.is_empty());
        let left: Vec<_> = unpack_dirs()
            .difference(&before)
            .filter(|dir| holds_a_package(dir))
            .cloned()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A directory shaped like the loader's (`/tmp/XXXXXX` holding `*/data/aotinductor`),
    /// marked with `owner` when given.
    fn fake_unpack_dir(owner: Option<Owner>) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37);
            let name = format!("mg{:04x}", (std::process::id() ^ n) & 0xffff);
            let dir = Path::new(UNPACK_ROOT).join(name);
            if std::fs::create_dir(&dir).is_ok() {
                break dir;
            }
        };
        std::fs::create_dir_all(dir.join("model/data/aotinductor")).unwrap();
        if let Some(owner) = owner {
            std::fs::write(dir.join(OWNER_MARK), owner.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn a_load_tidies_only_the_directories_it_made_itself() {
        let _tmp = tmp_to_myself();
        let mut foreign = None;
        let mut ours = None;
        let failed = unpacking(false, || {
            // Another server unpacking into /tmp at the same moment...
            foreign = Some(fake_unpack_dir(None));
            // ...and this load's own directory, made as libtorch makes it.
            let mut template = *b"/tmp/XXXXXX\0";
            // SAFETY: a writable NUL-terminated template ending in XXXXXX.
            let made = unsafe { mkdtemp(template.as_mut_ptr().cast()) };
            assert!(!made.is_null());
            let dir = PathBuf::from(std::str::from_utf8(&template[..11]).unwrap());
            // Marked as this process's before the loader puts anything in it.
            let mark = std::fs::read_to_string(dir.join(OWNER_MARK)).unwrap();
            assert_eq!(Owner::parse(&mark), Some(Owner::this_process()));
            std::fs::create_dir_all(dir.join("model/data/aotinductor")).unwrap();
            ours = Some(dir);
            Some("the load failed".to_string())
        });
        assert_eq!(failed.as_deref(), Some("the load failed"));
        let (foreign, ours) = (foreign.unwrap(), ours.unwrap());
        assert!(!ours.exists(), "{}", ours.display());
        assert!(foreign.exists(), "{}", foreign.display());
        std::fs::remove_dir_all(foreign).unwrap();
        // Outside a load nothing is noted (and nothing tidied).
        let mut template = *b"/tmp/XXXXXX\0";
        assert!(!unsafe { mkdtemp(template.as_mut_ptr().cast()) }.is_null());
        assert!(MADE_HERE.with(|made| made.borrow().is_none()));
        std::fs::remove_dir(std::str::from_utf8(&template[..11]).unwrap()).unwrap();
    }

    #[test]
    fn stale_unpack_dirs_of_gone_owners_are_removed_and_no_others() {
        let _tmp = tmp_to_myself();
        let gone = {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            Owner { pid, started: 1 }
        };
        assert!(!gone.is_alive());
        let alive = Owner::this_process();
        assert!(alive.is_alive(), "{alive}");
        let stale = fake_unpack_dir(Some(gone));
        // Killed right after mkdtemp, before anything was unpacked.
        let bare = fake_unpack_dir(Some(gone));
        std::fs::remove_dir_all(bare.join("model")).unwrap();
        let ours = fake_unpack_dir(Some(alive));
        let unmarked = fake_unpack_dir(None);
        assert!(remove_stale_unpack_dirs() >= 2);
        assert!(!stale.exists(), "{}", stale.display());
        assert!(!bare.exists(), "{}", bare.display());
        assert!(ours.exists() && unmarked.exists());
        for dir in [ours, unmarked] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn an_owner_reads_back_as_written() {
        let owner = Owner::this_process();
        assert_eq!(Owner::parse(&owner.to_string()), Some(owner));
        assert_eq!(Owner::parse("12 x"), None);
        assert_eq!(Owner::parse(""), None);
    }

    #[test]
    fn the_torch_version_is_the_one_linked() {
        let version = torch_version();
        assert!(version.starts_with("2."), "{version}");
    }
}
