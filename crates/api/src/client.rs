//! A blocking client of the API: bearer token, JSON in and out, and every
//! non-2xx answer turned into the server's [`ApiError`].

use std::io::Read;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Why a call failed: the server refused it, or it could not be made.
#[derive(Debug)]
pub enum ClientError {
    /// The server answered with an error status.
    Api { status: u16, error: ApiError },
    /// No answer (connection refused, timeout, bad response).
    Transport(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Api { status, error } => {
                write!(f, "[{}] {}", error.code, error.message)?;
                if let Some(field) = &error.field {
                    write!(f, " (field {field})")?;
                }
                write!(f, " (HTTP {status})")
            }
            ClientError::Transport(e) => write!(f, "cannot reach the server: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

#[derive(Clone)]
pub struct Client {
    base: String,
    /// Shared by clones, so a rotated token reaches every thread at once.
    token: std::sync::Arc<std::sync::RwLock<String>>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: std::sync::Arc::new(std::sync::RwLock::new(token.to_string())),
            agent,
        }
    }

    /// The same client (sharing its token) whose calls give up after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout)).build().into();
        Client { base: self.base.clone(), token: self.token.clone(), agent }
    }

    /// The token this client (and its clones) sends.
    pub fn token(&self) -> String {
        self.token.read().expect("token lock").clone()
    }

    /// Replaces the token of this client and all its clones.
    pub fn set_token(&self, token: &str) {
        *self.token.write().expect("token lock") = token.to_string();
    }

    /// POSTs JSON with extra headers.
    pub fn post_with<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &B,
    ) -> Result<T, ClientError> {
        let mut request = self.agent.post(&self.url(path)).header("Authorization", &self.auth());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.answer(request.send_json(body))
    }

    /// POSTs raw bytes with extra headers.
    pub fn post_bytes_with<T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<T, ClientError> {
        let mut request = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.auth())
            .header("Content-Type", "application/octet-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.answer(request.send(body))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token.read().expect("token lock"))
    }

    fn answer<T: DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = result.map_err(|e| ClientError::Transport(format!("{}: {e}", self.base)))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| ClientError::Transport(e.to_string()))?;
        if (200..300).contains(&status) {
            serde_json::from_str(&text).map_err(|e| ClientError::Transport(format!("unexpected answer: {e}: {text}")))
        } else {
            let error = serde_json::from_str(&text).unwrap_or(ApiError {
                code: "http_error".into(),
                message: text,
                field: None,
            });
            Err(ClientError::Api { status, error })
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.answer(self.agent.get(&self.url(path)).header("Authorization", &self.auth()).call())
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.answer(self.agent.post(&self.url(path)).header("Authorization", &self.auth()).send_json(body))
    }

    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, ClientError> {
        self.answer(
            self.agent
                .post(&self.url(path))
                .header("Authorization", &self.auth())
                .header("Content-Type", "application/octet-stream")
                .send(body),
        )
    }

    /// Streams a text body (logs) into `out` as it arrives.
    pub fn stream(&self, path: &str, out: &mut dyn std::io::Write) -> Result<(), ClientError> {
        let mut response = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &self.auth())
            .call()
            .map_err(|e| ClientError::Transport(format!("{}: {e}", self.base)))?;
        let status = response.status().as_u16();
        let mut reader = response.body_mut().as_reader();
        if !(200..300).contains(&status) {
            let mut text = String::new();
            let _ = reader.read_to_string(&mut text);
            let error = serde_json::from_str(&text).unwrap_or(ApiError {
                code: "http_error".into(),
                message: text,
                field: None,
            });
            return Err(ClientError::Api { status, error });
        }
        let mut buffer = [0u8; 8192];
        loop {
            let n = reader.read(&mut buffer).map_err(|e| ClientError::Transport(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buffer[..n]).map_err(|e| ClientError::Transport(e.to_string()))?;
            let _ = out.flush();
        }
    }
}
