//! The one network read of the start-up checks: a model's config.json from the Hugging
//! Face Hub (or `HF_ENDPOINT`), fetched alone, before any weight. It sizes the memory plan
//! and tells a token without access to a gated model from a missing token.

use std::time::Duration;

/// What the Hub said.
#[derive(Debug)]
pub enum Remote {
    Config(serde_json::Value),
    /// 401/403: gated and this token (or none) has no access.
    NoAccess(u16),
    /// 404: no such repository or revision.
    NotFound,
    /// Network trouble or an unexpected answer; the download will tell more.
    Unreachable(String),
}

/// Fetches `{endpoint}/{id}/resolve/{revision}/config.json` within a few seconds.
pub fn fetch_config(
    endpoint: &str,
    id: &str,
    revision: Option<&str>,
    token: Option<&str>,
) -> Remote {
    let url = format!(
        "{}/{id}/resolve/{}/config.json",
        endpoint.trim_end_matches('/'),
        revision.unwrap_or("main")
    );
    let run = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, body))
    };
    let answer = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run),
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok((200, body)) => match serde_json::from_slice(&body) {
            Ok(v) => Remote::Config(v),
            Err(e) => Remote::Unreachable(format!("{url} is not JSON: {e}")),
        },
        Ok((s @ (401 | 403), _)) => Remote::NoAccess(s),
        Ok((404, _)) => Remote::NotFound,
        Ok((s, _)) => Remote::Unreachable(format!("{url} answered {s}")),
        Err(e) => Remote::Unreachable(format!("{url}: {e}")),
    }
}
