//! GetModelStatus as TF Serving answers it, for every protocol: gRPC sends the proto, REST
//! and the admin API print it as JSON.

use crate::error::Error;
use crate::proto::serving::model_version_status::State;
use crate::proto::serving::{GetModelStatusResponse, ModelVersionStatus, StatusProto};
use crate::registry::{Registry, VersionSelector, VersionState};

fn state_proto(state: VersionState) -> State {
    match state {
        VersionState::Start => State::Start,
        VersionState::Loading => State::Loading,
        VersionState::Available => State::Available,
        VersionState::Unloading => State::Unloading,
        VersionState::End => State::End,
    }
}

/// The status of every version of a model, or of the version a number or label selects.
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
                    // tensorflow.error.Code numbers the codes as gRPC does.
                    Some(error) => StatusProto {
                        error_code: error.code() as i32,
                        error_message: error.to_string(),
                    },
                }),
            })
            .collect(),
    })
}
