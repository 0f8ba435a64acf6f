//! The small HTTP client of the tests: one request, its status and body.

use serde_json::Value;

/// Sends `method url` (with `Authorization: Bearer token` when given) and answers the
/// status code and the body; fails with a message when there is no answer in `TIMEOUT`.
pub async fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut request = reqwest::Client::new()
        .request(method, url)
        .timeout(super::TIMEOUT);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok((status, body))
}

/// `request`, with the body as JSON (`null` when it is not JSON).
pub async fn call(method: &str, url: &str, token: Option<&str>) -> Result<(u16, Value), String> {
    let (status, body) = request(method, url, token).await?;
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// `POST url` with `body`: the status code and the body.
pub async fn post(url: &str, body: &str) -> Result<(u16, String), String> {
    let response = reqwest::Client::new()
        .post(url)
        .timeout(super::TIMEOUT)
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok((status, body))
}
