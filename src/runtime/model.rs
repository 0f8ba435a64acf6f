//! The one interface workers run a version through, whatever its format: a TorchScript
//! module (`model.pt`) or an AOTInductor package (`model.pt2`). Nothing above the runtime
//! knows which one runs.

use super::aoti::Package;
use super::script::ScriptModule;
use super::{Device, LoadError, RunError};
use std::path::Path;
use tch::IValue;

/// The file formats a version directory may hold its model in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// `model.pt`, written by `torch.jit.save`.
    TorchScript,
    /// `model.pt2`, written by `torch._inductor.aoti_compile_and_package`.
    AotiPackage,
}

impl ModelFormat {
    /// Every format, in the order a version directory is searched.
    pub const ALL: [ModelFormat; 2] = [ModelFormat::TorchScript, ModelFormat::AotiPackage];

    /// The file a version directory holds a model of this format in.
    pub fn file_name(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => "model.pt",
            ModelFormat::AotiPackage => "model.pt2",
        }
    }

    /// The format of a model file, by its name.
    pub fn of_file(name: &str) -> Option<ModelFormat> {
        ModelFormat::ALL
            .into_iter()
            .find(|format| format.file_name() == name)
    }
}

/// A version's model on one device, shared by that device's workers.
pub(super) enum Model {
    /// A TorchScript module, as saved or frozen and optimized for inference at load.
    TorchScript(ScriptModule),
    Aoti(Package),
}

impl Model {
    /// Loads the model file at `path` onto `device`, for `callers` threads calling it at
    /// once (an AOTInductor package gets that many runners; a TorchScript module runs
    /// concurrent calls by itself). `freeze`: freeze a TorchScript module keeping these
    /// methods, and optimize it for inference.
    pub(super) fn load(
        path: &Path,
        device: Device,
        callers: usize,
        freeze: Option<&[String]>,
    ) -> Result<Model, LoadError> {
        let failed = |message: String| LoadError::Torch {
            path: path.display().to_string(),
            message,
        };
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        match ModelFormat::of_file(name) {
            Some(ModelFormat::AotiPackage) => Package::load(path, device, callers)
                .map(Model::Aoti)
                .map_err(failed),
            _ => ScriptModule::load(path, device, freeze)
                .map(Model::TorchScript)
                .map_err(failed),
        }
    }

    /// The bytes the model holds on its device: a module's parameters, buffers and tensor
    /// attributes, a package's constants. What a forward allocates comes on top.
    pub(super) fn resident_bytes(&self) -> u64 {
        match self {
            Model::TorchScript(module) => module.tensor_bytes(),
            Model::Aoti(package) => package.constant_bytes(),
        }
    }

    /// Calls `method` on `inputs` (already on the model's device). A package has one
    /// method, `forward`, and returns its outputs flattened: one tensor, or a tuple.
    pub(super) fn run(&self, method: &str, inputs: Vec<tch::Tensor>) -> Result<IValue, RunError> {
        match self {
            Model::TorchScript(module) => module.run(method, &inputs),
            Model::Aoti(_) if method != "forward" => Err(RunError::Torch(format!(
                "an AOTInductor package has one method, forward, not '{method}'"
            ))),
            Model::Aoti(package) => {
                let mut outputs = package.run(&inputs)?;
                Ok(match outputs.len() {
                    1 => IValue::Tensor(outputs.remove(0)),
                    _ => IValue::Tuple(outputs.into_iter().map(IValue::Tensor).collect()),
                })
            }
        }
    }
}
