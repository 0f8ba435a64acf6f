//! TorchScript modules (`model.pt`), through `script_shim.cpp`: loaded in eval mode with
//! their tensors' bytes counted (a version's resident footprint), and with
//! `--freeze_models` frozen (attributes inlined as constants) and optimized for inference
//! (conv + batch-norm folded, MKL-DNN layouts on the CPU) at load. Freezing is off by
//! default: it bakes in the attributes a model may change at run time.

use super::{classify_torch_error, Device, RunError};
use std::ffi::{c_char, c_int, CString};
use std::path::Path;
use std::ptr::NonNull;
use tch::IValue;

#[repr(C)]
struct RawScript {
    _private: [u8; 0],
}

extern "C" {
    fn modelgate_script_load(
        path: *const c_char,
        cuda_index: c_int,
        freeze: c_int,
        methods: *const *const c_char,
        method_count: usize,
        loaded: *mut *mut RawScript,
        bytes: *mut usize,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn modelgate_script_run(
        model: *mut RawScript,
        method: *const c_char,
        inputs: *const *const torch_sys::C_tensor,
        count: usize,
        form: *mut c_int,
        outputs: *mut *mut *mut torch_sys::C_tensor,
        output_count: *mut usize,
        keys: *mut *mut c_char,
        keys_length: *mut usize,
    ) -> *mut c_char;
    fn modelgate_script_free(model: *mut RawScript);
}

/// A TorchScript module (frozen and optimized, or as saved); its methods may run on many
/// threads at once.
pub struct ScriptModule {
    raw: NonNull<RawScript>,
    /// The bytes of its parameters, buffers, tensor attributes and tensor constants.
    tensor_bytes: u64,
}

// SAFETY: a torch::jit::Module's methods are safe to call concurrently (the interpreter
// keeps per-call state); the module is freed once, in Drop.
unsafe impl Send for ScriptModule {}
unsafe impl Sync for ScriptModule {}

impl ScriptModule {
    /// Loads the TorchScript file at `path` onto `device` in eval mode; with `freeze`,
    /// freezes it keeping those methods (the ones its signatures call) and optimizes it for
    /// inference.
    pub fn load(
        path: &Path,
        device: Device,
        freeze: Option<&[String]>,
    ) -> Result<ScriptModule, String> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{} has a NUL byte in its path", path.display()))?;
        let names = freeze
            .unwrap_or_default()
            .iter()
            .map(|m| CString::new(m.as_str()).map_err(|_| format!("method name {m:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let pointers: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let cuda_index = match device {
            Device::Cpu => -1,
            Device::Cuda(n) => c_int::try_from(n).map_err(|_| format!("no CUDA device {n}"))?,
        };
        let mut raw: *mut RawScript = std::ptr::null_mut();
        let mut bytes = 0usize;
        // SAFETY: the shim reads the path and the names, and sets `raw` and `bytes` on
        // success only.
        let message = unsafe {
            modelgate_script_load(
                c_path.as_ptr(),
                cuda_index,
                c_int::from(freeze.is_some()),
                pointers.as_ptr(),
                pointers.len(),
                &mut raw,
                &mut bytes,
            )
        };
        if let Some(message) = super::aoti::take_message(message) {
            return Err(super::trim_torch_message(&message));
        }
        let raw = NonNull::new(raw).ok_or("loading returned nothing")?;
        Ok(ScriptModule {
            raw,
            tensor_bytes: bytes as u64,
        })
    }

    /// The bytes of the module's parameters, buffers, tensor attributes and the tensor
    /// constants of its methods (a traced module's non-parameter tensors, a frozen
    /// module's weights), each storage once.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensor_bytes
    }

    /// Calls `method` on `inputs`; the result as TorchScript would give it.
    pub fn run(&self, method: &str, inputs: &[tch::Tensor]) -> Result<IValue, RunError> {
        let method =
            CString::new(method).map_err(|_| RunError::Torch(format!("method name {method:?}")))?;
        let pointers: Vec<*const torch_sys::C_tensor> =
            inputs.iter().map(tch::Tensor::as_ptr).collect();
        let (mut form, mut count, mut keys_length) = (0 as c_int, 0usize, 0usize);
        let mut outputs: *mut *mut torch_sys::C_tensor = std::ptr::null_mut();
        let mut keys: *mut c_char = std::ptr::null_mut();
        // SAFETY: the inputs are live tensors borrowed for the call; on success the shim
        // hands over `count` owned tensors and `keys_length` bytes of keys, freed below.
        let message = unsafe {
            modelgate_script_run(
                self.raw.as_ptr(),
                method.as_ptr(),
                pointers.as_ptr(),
                pointers.len(),
                &mut form,
                &mut outputs,
                &mut count,
                &mut keys,
                &mut keys_length,
            )
        };
        if let Some(message) = super::aoti::take_message(message) {
            return Err(classify_torch_error(&message));
        }
        // SAFETY: as above; each tensor pointer is taken once, then both arrays are freed.
        let tensors: Vec<tch::Tensor> = unsafe { std::slice::from_raw_parts(outputs, count) }
            .iter()
            .map(|&tensor| unsafe { tch::Tensor::from_ptr(tensor) })
            .collect();
        let key_bytes = unsafe { std::slice::from_raw_parts(keys.cast::<u8>(), keys_length) };
        let refused = (form == 3).then(|| String::from_utf8_lossy(key_bytes).into_owned());
        let names: Vec<String> = key_bytes
            .split(|&b| b == 0)
            .take(count)
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect();
        unsafe {
            super::aoti::free_buffer(outputs.cast());
            super::aoti::free_buffer(keys.cast());
        }
        if let Some(what) = refused {
            return Err(RunError::BadOutput(format!(
                "{what}; a method must return a tensor, a tuple of tensors or a Dict[str, Tensor]"
            )));
        }
        let mut tensors = tensors.into_iter().map(IValue::Tensor);
        Ok(match form {
            0 => tensors
                .next()
                .ok_or_else(|| RunError::BadOutput("the result has no tensor".into()))?,
            1 => IValue::Tuple(tensors.collect()),
            _ => IValue::GenericDict(names.into_iter().map(IValue::String).zip(tensors).collect()),
        })
    }
}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim's load and is freed once.
        unsafe { modelgate_script_free(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_in_the_graph_count_as_resident_bytes() {
        // Traced, a tensor that is not a parameter becomes a constant of the graph: 1000
        // floats used twice (one storage), and a parameter-free multiplication.
        let table = tch::Tensor::ones([1000], (tch::Kind::Float, tch::Device::Cpu));
        let example = tch::Tensor::zeros([2, 1000], (tch::Kind::Float, tch::Device::Cpu));
        let traced = tch::CModule::create_by_tracing("t", "forward", &[example], &mut |xs| {
            vec![&xs[0] * &table + &table]
        })
        .unwrap();
        let path = std::env::temp_dir().join(format!("modelgate-consts-{}.pt", std::process::id()));
        traced.save(&path).unwrap();
        let loaded = ScriptModule::load(&path, Device::Cpu, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.tensor_bytes(), 4000);
    }
}
