//! `tensorflow.serving.ModelService`.

use super::prediction::{model_and_version, respond};
use crate::api::admin::AdminToken;
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
    /// With `--admin_token`, HandleReloadConfigRequest needs it as every other call that
    /// changes what is served does; without one it is open, as in TF Serving (whose
    /// clients have no way to send a token), and the start says so.
    token: Option<AdminToken>,
}

impl ModelServiceApi {
    pub fn new(
        inference: Inference,
        registry: Arc<Registry>,
        manager: ManagerHandle,
        token: Option<AdminToken>,
    ) -> ModelServiceApi {
        if token.is_none() {
            tracing::warn!(
                "ModelService/HandleReloadConfigRequest is open to every client of the gRPC \
                 port, as in TF Serving; --admin_token or --admin_token_file restricts it"
            );
        }
        ModelServiceApi {
            inference,
            registry,
            manager,
            token,
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
        if let Some(token) = &self.token {
            let authorization = request.metadata().get("authorization");
            if !token.authorizes(authorization.map(|value| value.as_bytes())) {
                return Err(Error::Unauthenticated(
                    "ReloadConfig needs 'authorization: Bearer <admin token>' when the server \
                     runs with an admin token"
                        .into(),
                )
                .into());
            }
        }
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
