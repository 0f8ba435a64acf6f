//! The model config (`--model_config_file`, ModelServerConfig text format, or
//! `--model_name/--model_base_path`) turned into validated [`ModelSpec`]s.

use super::logging::{logging_spec, LoggingSpec};
use super::text_format::{parse_text_format, ConfigError};
use crate::proto::serving::file_system_storage_path_source_config::servable_version_policy::PolicyChoice;
use crate::proto::serving::model_server_config::Config;
use crate::proto::serving::{ModelConfig, ModelServerConfig};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Which of the versions found under a base path should serve (TF Serving's
/// ServableVersionPolicy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The `n` highest versions (TF Serving's default, with n = 1).
    Latest(u32),
    All,
    Specific(BTreeSet<i64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those present in storage. Pure, so it is unit tested.
    pub fn aspired(&self, present: &BTreeSet<i64>) -> BTreeSet<i64> {
        match self {
            VersionPolicy::Latest(n) => present.iter().rev().take(*n as usize).copied().collect(),
            VersionPolicy::All => present.clone(),
            VersionPolicy::Specific(wanted) => wanted.intersection(present).copied().collect(),
        }
    }
}

/// How the config file names the model format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// `pytorch` (also empty, `torchscript`, `pytorch_torchscript`).
    TorchScript,
    /// TF Serving's `tensorflow`: accepted so TF Serving configs are reusable, and warned
    /// about; the version directory must still hold a TorchScript model.
    TensorflowName,
}

/// One model to serve, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    /// A local directory or `s3://bucket/prefix`.
    pub base_path: String,
    pub platform: Platform,
    pub policy: VersionPolicy,
    /// Version labels (`stable` -> 1); a label binds once its version is AVAILABLE.
    pub labels: BTreeMap<String, i64>,
    /// Sampled request logging (`logging_config`); `None` logs nothing.
    pub logging: Option<LoggingSpec>,
}

/// Parses ModelServerConfig text; `what` names the file in errors.
pub fn parse_model_server_config(what: &str, text: &str) -> Result<ModelServerConfig, ConfigError> {
    parse_text_format("tensorflow.serving.ModelServerConfig", what, text)
}

/// The models of a ModelServerConfig, checked: names unique and non-empty, base paths
/// present, platforms known, labels on positive versions.
pub fn model_specs_from_config(config: &ModelServerConfig) -> Result<Vec<ModelSpec>, ConfigError> {
    let list = match &config.config {
        Some(Config::ModelConfigList(list)) => &list.config,
        Some(Config::CustomModelConfig(_)) => {
            return Err(ConfigError::Invalid(
                "custom_model_config is not supported; use model_config_list".into(),
            ))
        }
        None => return Ok(Vec::new()),
    };
    let mut seen = HashSet::new();
    list.iter()
        .map(|model| {
            let spec = model_spec(model)?;
            if !seen.insert(spec.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "model '{}' is configured twice",
                    spec.name
                )));
            }
            Ok(spec)
        })
        .collect()
}

/// The one model of single-model mode (`--model_name`, `--model_base_path`).
pub fn single_model_spec(name: &str, base_path: &str) -> Result<ModelSpec, ConfigError> {
    model_spec(&ModelConfig {
        name: name.to_string(),
        base_path: base_path.to_string(),
        ..Default::default()
    })
}

fn model_spec(model: &ModelConfig) -> Result<ModelSpec, ConfigError> {
    let name = model.name.trim();
    if name.is_empty() {
        return Err(ConfigError::Invalid("a model config has no name".into()));
    }
    if model.base_path.trim().is_empty() {
        return Err(ConfigError::Invalid(format!(
            "model '{name}' has no base_path"
        )));
    }
    let platform = match model.model_platform.as_str() {
        "" | "pytorch" | "torchscript" | "pytorch_torchscript" => Platform::TorchScript,
        "tensorflow" => Platform::TensorflowName,
        other => {
            return Err(ConfigError::Invalid(format!(
                "model '{name}' has model_platform '{other}'; modelgate serves 'pytorch' \
                 (also accepted: torchscript, pytorch_torchscript, tensorflow)"
            )))
        }
    };
    let policy = match model
        .model_version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref())
    {
        None => VersionPolicy::default(),
        // proto3 cannot tell 0 from unset; TF Serving documents 1 as the default.
        Some(PolicyChoice::Latest(latest)) => VersionPolicy::Latest(latest.num_versions.max(1)),
        Some(PolicyChoice::All(_)) => VersionPolicy::All,
        Some(PolicyChoice::Specific(specific)) => {
            if specific.versions.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "model '{name}': model_version_policy specific {{}} lists no versions"
                )));
            }
            if let Some(version) = specific.versions.iter().find(|&&v| v <= 0) {
                return Err(ConfigError::Invalid(format!(
                    "model '{name}': model_version_policy specific lists version {version}; \
                     versions are positive (a directory named 0 or less is never one)"
                )));
            }
            VersionPolicy::Specific(specific.versions.iter().copied().collect())
        }
    };
    let labels: BTreeMap<String, i64> = model
        .version_labels
        .iter()
        .map(|(label, &version)| (label.clone(), version))
        .collect();
    if let Some((label, version)) = labels.iter().find(|(_, &v)| v <= 0) {
        return Err(ConfigError::Invalid(format!(
            "model '{name}': version label '{label}' points at version {version}; versions are positive"
        )));
    }
    if let VersionPolicy::Specific(wanted) = &policy {
        for (label, version) in labels.iter().filter(|(_, v)| !wanted.contains(v)) {
            tracing::warn!(
                model = name,
                label,
                version,
                "the version label points at a version model_version_policy specific never \
                 loads: it will not bind"
            );
        }
    }
    let logging = match &model.logging_config {
        Some(config) => logging_spec(name, config)?,
        None => None,
    };
    Ok(ModelSpec {
        name: name.to_string(),
        base_path: model.base_path.trim().to_string(),
        platform,
        policy,
        labels,
        logging,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        model_config_list {
          config {
            name: "mlp"
            base_path: "models/mlp"
            model_platform: "pytorch"
            model_version_policy { all {} }
            version_labels { key: "stable" value: 1 }
            version_labels { key: "canary" value: 2 }
          }
          config {
            name: "tiny"
            base_path: "s3://bucket/tiny"
            model_platform: "tensorflow"
            model_version_policy { latest { num_versions: 2 } }
          }
          config { name: "pinned" base_path: "/m" model_version_policy { specific { versions: 3 versions: 5 } } }
        }"#;

    #[test]
    fn parses_a_tf_serving_config() {
        let config = parse_model_server_config("models.config", CONFIG).unwrap();
        let specs = model_specs_from_config(&config).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].name, "mlp");
        assert_eq!(specs[0].policy, VersionPolicy::All);
        assert_eq!(specs[0].labels["canary"], 2);
        assert_eq!(specs[1].platform, Platform::TensorflowName);
        assert_eq!(specs[1].policy, VersionPolicy::Latest(2));
        assert_eq!(
            specs[2].policy,
            VersionPolicy::Specific(BTreeSet::from([3, 5]))
        );
    }

    #[test]
    fn refuses_what_cannot_serve() {
        for (text, needle) in [
            (
                r#"model_config_list { config { name: "a" } }"#,
                "no base_path",
            ),
            (
                r#"model_config_list { config { name: "a" base_path: "/a" model_platform: "onnx" } }"#,
                "onnx",
            ),
            (
                r#"model_config_list { config { name: "a" base_path: "/a" } config { name: "a" base_path: "/b" } }"#,
                "twice",
            ),
            (
                r#"model_config_list { config { name: "a" base_path: "/a" version_labels { key: "x" value: 0 } } }"#,
                "label 'x'",
            ),
            (
                r#"model_config_list { config { name: "a" base_path: "/a" model_version_policy { specific { versions: 2 versions: 0 } } } }"#,
                "lists version 0",
            ),
        ] {
            let config = parse_model_server_config("c", text).unwrap();
            let err = model_specs_from_config(&config).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn policies_pick_versions() {
        let present = BTreeSet::from([1, 2, 3]);
        assert_eq!(
            VersionPolicy::Latest(1).aspired(&present),
            BTreeSet::from([3])
        );
        assert_eq!(VersionPolicy::Latest(5).aspired(&present), present);
        assert_eq!(VersionPolicy::All.aspired(&present), present);
        assert_eq!(
            VersionPolicy::Specific(BTreeSet::from([2, 7])).aspired(&present),
            BTreeSet::from([2])
        );
        assert!(VersionPolicy::Latest(1)
            .aspired(&BTreeSet::new())
            .is_empty());
    }
}
