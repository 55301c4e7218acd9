//! NATS through async-nats. Core NATS: a batch is delivered once a flush (PING/PONG) after its
//! publishes returned, i.e. the server has processed them; core NATS itself then delivers at
//! most once to subscribers that are connected. JetStream: a batch is delivered once the stream
//! acknowledged every message; each carries a `Nats-Msg-Id` unique to this run, stream and frame,
//! so the server drops the duplicates that a resend after a lost acknowledgement would make.

pub mod config;

use async_nats::jetstream;
use async_nats::{ConnectErrorKind, ConnectOptions};

use super::delivery::{Failure, Message, Transport};
use super::settings::SinkRun;
pub use config::*;

/// The NATS transport.
pub struct NatsSink {
    s: NatsSettings,
    run: SinkRun,
    rt: tokio::runtime::Runtime,
    client: Option<async_nats::Client>,
    js: Option<jetstream::Context>,
    run_id: String,
}

impl NatsSink {
    /// A transport; connects on first use.
    pub fn new(s: NatsSettings, run: SinkRun) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let run_id = format!("{:x}-{:x}", t.as_nanos(), std::process::id());
        Ok(Self {
            s,
            run,
            rt,
            client: None,
            js: None,
            run_id,
        })
    }
}

impl Transport for NatsSink {
    fn connect(&mut self) -> Result<(), Failure> {
        let mut o = ConnectOptions::new()
            .connection_timeout(self.run.timeout)
            .request_timeout(Some(self.run.timeout))
            .name(format!("poolpipe-{}", self.run.pipeline));
        if let Some(l) = &self.s.login {
            o = o.user_and_password(l.username.clone(), l.password.expose().to_string());
        }
        if let Some(t) = &self.s.token {
            o = o.token(t.expose().to_string());
        }
        if let Some(t) = &self.s.tls {
            super::install_crypto_provider();
            o = o.require_tls(true).add_root_certificates(t.ca.clone());
            if let Some((c, k)) = &t.client {
                o = o.add_client_certificate(c.clone(), k.clone());
            }
        }
        let addr = format!(
            "{}://{}",
            if self.s.tls.is_some() { "tls" } else { "nats" },
            self.s.addr
        );
        let (jetstream_on, stream, subjects) = (
            self.s.jetstream,
            self.s.stream.clone(),
            self.s.subject.with_wildcards("*"),
        );
        let (client, js) = self.rt.block_on(async {
            let client = o.connect(addr).await.map_err(|e| match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    Failure::auth(format!("the server refused the credentials: {}", e.kind()))
                }
                ConnectErrorKind::Tls => Failure::auth(format!("TLS: {e}")),
                _ => Failure::retriable(e.to_string()),
            })?;
            let js = if jetstream_on {
                let js = jetstream::new(client.clone());
                if let Some(name) = stream {
                    js.get_or_create_stream(jetstream::stream::Config {
                        name: name.clone(),
                        subjects: vec![subjects],
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| Failure::auth(format!("JetStream stream {name}: {e}")))?;
                }
                Some(js)
            } else {
                None
            };
            Ok::<_, Failure>((client, js))
        })?;
        self.client = Some(client);
        self.js = js;
        Ok(())
    }

    fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
        if self.client.is_none() {
            self.connect()?;
        }
        let Some(client) = self.client.as_ref() else {
            return Err(Failure::retriable("not connected"));
        };
        let s = &self.s;
        let run = &self.run;
        let run_id = &self.run_id;
        let js = self.js.as_ref();
        self.rt.block_on(async {
            let timeout = run.timeout;
            match js {
                None => {
                    for (i, m) in batch.iter().enumerate() {
                        let subject = m.topic(&s.subject, &s.events_subject, &run.pipeline);
                        client
                            .publish(subject, m.payload.to_string().into())
                            .await
                            .map_err(|e| Failure::retriable(e.to_string()).progress(0, i))?;
                    }
                    match tokio::time::timeout(timeout, client.flush()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            Err(Failure::retriable(format!("flush: {e}")).progress(0, batch.len()))
                        }
                        Err(_) => {
                            Err(Failure::retriable("timed out flushing").progress(0, batch.len()))
                        }
                    }
                }
                Some(js) => {
                    let mut acks = Vec::with_capacity(batch.len());
                    for (i, m) in batch.iter().enumerate() {
                        let subject = m.topic(&s.subject, &s.events_subject, &run.pipeline);
                        let msg = jetstream::message::PublishMessage::build()
                            .payload(m.payload.to_string().into())
                            .message_id(format!("{run_id}-{}", m.id()));
                        let ack = js
                            .send_publish(subject, msg)
                            .await
                            .map_err(|e| Failure::retriable(e.to_string()).progress(0, i))?;
                        acks.push(ack);
                    }
                    for (i, ack) in acks.into_iter().enumerate() {
                        match tokio::time::timeout(timeout, ack).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                let f = if e.kind()
                                    == jetstream::context::PublishErrorKind::StreamNotFound
                                {
                                    Failure::auth(format!(
                                        "no JetStream stream takes this subject ({e}); \
                                         create one or set `stream`"
                                    ))
                                } else {
                                    Failure::retriable(e.to_string())
                                };
                                return Err(f.progress(i, batch.len()));
                            }
                            Err(_) => {
                                return Err(Failure::retriable("timed out waiting for acks")
                                    .progress(i, batch.len()));
                            }
                        }
                    }
                    Ok(())
                }
            }
        })
    }

    fn disconnect(&mut self) {
        self.js = None;
        self.client = None;
    }
}
