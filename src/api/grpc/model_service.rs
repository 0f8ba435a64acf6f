//! `tensorflow.serving.ModelService`.

use super::prediction::{finish, model_and_version};
use crate::error::Error;
use crate::proto::serving::model_service_server::ModelService;
use crate::proto::serving::model_version_status::State;
use crate::proto::serving::{
    GetModelStatusRequest, GetModelStatusResponse, ModelVersionStatus, ReloadConfigRequest,
    ReloadConfigResponse, StatusProto,
};
use crate::proto::tensorflow::error::Code;
use crate::registry::{Registry, VersionSelector, VersionState};
use crate::telemetry::{Api, Protocol, RequestTimer};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ModelServiceApi {
    registry: Arc<Registry>,
}

impl ModelServiceApi {
    pub fn new(registry: Arc<Registry>) -> ModelServiceApi {
        ModelServiceApi { registry }
    }
}

fn state_proto(state: VersionState) -> State {
    match state {
        VersionState::Start => State::Start,
        VersionState::Loading => State::Loading,
        VersionState::Available => State::Available,
        VersionState::Unloading => State::Unloading,
        VersionState::End => State::End,
    }
}

/// GetModelStatus: the status of every version of a model, or of the version a number or
/// label selects. Shared with the REST API.
pub fn model_status(
    registry: &Registry,
    model: &str,
    selector: &VersionSelector,
) -> Result<GetModelStatusResponse, Error> {
    let version = match selector {
        VersionSelector::Latest => None,
        VersionSelector::Number(v) => Some(*v),
        VersionSelector::Label(_) => Some(registry.resolve(model, selector)?.version),
    };
    let statuses = registry.model_status(model, version)?;
    Ok(GetModelStatusResponse {
        model_version_status: statuses
            .into_iter()
            .map(|(version, status)| ModelVersionStatus {
                version,
                state: state_proto(status.state) as i32,
                status: Some(match status.error {
                    None => StatusProto::default(),
                    Some(message) => StatusProto {
                        error_code: Code::Unknown as i32,
                        error_message: message,
                    },
                }),
            })
            .collect(),
    })
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
        finish(&self.registry, timer, spec, result, |_| None)
    }

    async fn handle_reload_config_request(
        &self,
        _request: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        Err(Error::Unimplemented(
            "HandleReloadConfigRequest is not implemented by this modelgate release".into(),
        )
        .into())
    }
}
