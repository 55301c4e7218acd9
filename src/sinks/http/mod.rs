//! HTTP webhook: each batch is one `POST` of a JSON array of results, with
//! `Authorization: Bearer <token>` when a token is set. 2xx = delivered; connection errors,
//! time-outs, 408, 429 and 5xx are retried; 401 and 403 are credential errors (retried, logged as
//! errors); any other status refuses the batch for good (dropped, counted).

pub mod config;

use std::time::Duration;

use ureq::Agent;

use super::delivery::{Failure, FailureKind, Message, Transport};
use super::settings::Secret;

/// The HTTP transport.
pub struct HttpSink {
    url: String,
    token: Option<Secret>,
    agent: Agent,
}

impl HttpSink {
    /// A transport.
    pub fn new(url: String, token: Option<Secret>, timeout: Duration) -> Self {
        let agent = Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self { url, token, agent }
    }

    /// POSTs a JSON body; the status classifies the outcome.
    pub fn post(&self, body: String, n: usize) -> Result<(), Failure> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {}", t.expose()));
        }
        let resp = req
            .send(body)
            .map_err(|e| Failure::retriable(e.to_string()).progress(0, n))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => Ok(()),
            401 | 403 => {
                Err(Failure::auth(format!("the endpoint answered {status}")).progress(0, n))
            }
            408 | 429 | 500..=599 => {
                Err(Failure::retriable(format!("the endpoint answered {status}")).progress(0, n))
            }
            _ => Err(Failure {
                kind: FailureKind::Rejected,
                rejected: n,
                ..Failure::retriable(format!("the endpoint answered {status}")).progress(0, n)
            }),
        }
    }
}

impl Transport for HttpSink {
    fn connect(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
        let mut body =
            String::with_capacity(batch.iter().map(|m| m.payload.len() + 1).sum::<usize>() + 2);
        body.push('[');
        for (i, m) in batch.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&m.payload);
        }
        body.push(']');
        self.post(body, batch.len())
    }
}
