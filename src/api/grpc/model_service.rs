//! `tensorflow.serving.ModelService`.

use super::prediction::{model_and_version, respond};
use crate::api::model_status::model_status;
use crate::api::timer::RequestTimer;
use crate::config::model_specs_from_config;
use crate::error::Error;
use crate::inference::Inference;
use crate::proto::serving::model_server_config::Config;
use crate::proto::serving::model_service_server::ModelService;
use crate::proto::serving::{
    GetModelStatusRequest, GetModelStatusResponse, ReloadConfigRequest, ReloadConfigResponse,
    StatusProto,
};
use crate::registry::{ManagerHandle, Registry};
use crate::telemetry::{Api, Protocol};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ModelServiceApi {
    inference: Inference,
    /// Read for versions' status; the manager applies config changes.
    registry: Arc<Registry>,
    manager: ManagerHandle,
}

impl ModelServiceApi {
    pub fn new(
        inference: Inference,
        registry: Arc<Registry>,
        manager: ManagerHandle,
    ) -> ModelServiceApi {
        ModelServiceApi {
            inference,
            registry,
            manager,
        }
    }
}

#[tonic::async_trait]
impl ModelService for ModelServiceApi {
    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let timer = RequestTimer::start(Api::GetModelStatus, Protocol::Grpc);
        let request = request.into_inner();
        let spec = request.model_spec.as_ref();
        let result = model_and_version(spec)
            .and_then(|(model, selector)| model_status(&self.registry, &model, &selector));
        // The answer names no single version: the request's model is the only label.
        respond(&self.inference, timer, spec, result, |_| None)
    }

    /// Replaces the model config and answers once it is applied: new models listed and
    /// their versions loaded (or failed), removed ones unloaded. A config that cannot be
    /// served is refused whole (INVALID_ARGUMENT, as TF Serving) and the old one stays.
    async fn handle_reload_config_request(
        &self,
        request: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        let config = request.into_inner().config.unwrap_or_default();
        if !matches!(config.config, Some(Config::ModelConfigList(_))) {
            return Err(Error::InvalidArgument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. \
                 Only ModelConfigList is currently supported"
                    .into(),
            )
            .into());
        }
        let specs = model_specs_from_config(&config).map_err(|e| {
            tracing::error!("ReloadConfig refused: {e}");
            Error::InvalidArgument(e.to_string())
        })?;
        tracing::info!(
            models = specs.len(),
            "ReloadConfig: applying a new model config"
        );
        self.manager.set_models(specs).await.map_err(|e| {
            tracing::error!("ReloadConfig refused: {e}");
            Error::from(e)
        })?;
        tracing::info!("ReloadConfig: model config applied");
        Ok(Response::new(ReloadConfigResponse {
            status: Some(StatusProto::default()),
            ..Default::default()
        }))
    }
}
