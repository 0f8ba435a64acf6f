//! `tensorflow.serving.ModelService`.

use super::prediction::model_and_version;
use crate::error::Error;
use crate::proto::serving::model_service_server::ModelService;
use crate::proto::serving::model_version_status::State;
use crate::proto::serving::{
    GetModelStatusRequest, GetModelStatusResponse, ModelVersionStatus, ReloadConfigRequest,
    ReloadConfigResponse, StatusProto,
};
use crate::proto::tensorflow::error::Code;
use crate::registry::{Registry, VersionSelector, VersionState};
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

#[tonic::async_trait]
impl ModelService for ModelServiceApi {
    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let request = request.into_inner();
        let (model, selector) = model_and_version(request.model_spec.as_ref())?;
        let version = match selector {
            VersionSelector::Latest => None,
            VersionSelector::Number(v) => Some(v),
            VersionSelector::Label(_) => Some(self.registry.resolve(&model, &selector)?.version),
        };
        let statuses = self.registry.model_status(&model, version)?;
        Ok(Response::new(GetModelStatusResponse {
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
        }))
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
