//! Kafka through rskafka (pure Rust, no librdkafka build). A batch is cut into runs of
//! consecutive results for the same topic and partition; each run is one produce request with
//! `acks = all`, and counts as delivered once the broker returned its offsets. The partition is
//! an FNV-1a hash of the rendered key modulo the topic's partition count (not Java's murmur2
//! partitioner, so keys land on other partitions than with Java producers; ordering per stream
//! holds either way).

pub mod config;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rskafka::BackoffConfig;
use rskafka::chrono::DateTime;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;

use super::delivery::{Failure, FailureKind, Message, Transport};
use super::settings::SinkRun;
pub use config::*;

/// The Kafka transport.
pub struct KafkaSink {
    rt: tokio::runtime::Runtime,
    inner: Inner,
}

struct Inner {
    s: KafkaSettings,
    run: SinkRun,
    client: Option<Client>,
    /// Partition count per topic.
    topics: HashMap<String, i32>,
    partitions: HashMap<(String, i32), PartitionClient>,
}

impl KafkaSink {
    /// A transport; connects on first use.
    pub fn new(s: KafkaSettings, run: SinkRun) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            rt,
            inner: Inner {
                s,
                run,
                client: None,
                topics: HashMap::new(),
                partitions: HashMap::new(),
            },
        })
    }
}

fn classify(e: &KafkaError) -> Failure {
    match e {
        KafkaError::ServerError { protocol_error, .. } => match protocol_error {
            ProtocolError::MessageTooLarge
            | ProtocolError::RecordListTooLarge
            | ProtocolError::InvalidRecord
            | ProtocolError::CorruptMessage
            | ProtocolError::InvalidTopicException => Failure {
                kind: FailureKind::Rejected,
                ..Failure::retriable(format!("broker refused the records: {protocol_error}"))
            },
            ProtocolError::SaslAuthenticationFailed
            | ProtocolError::TopicAuthorizationFailed
            | ProtocolError::ClusterAuthorizationFailed => {
                Failure::auth(format!("broker refused: {protocol_error}"))
            }
            other => Failure::retriable(format!("broker error: {other}")),
        },
        KafkaError::Connection(c) => {
            let text = c.to_string();
            if text.to_ascii_lowercase().contains("sasl") {
                Failure::auth(format!("SASL: {text}"))
            } else {
                Failure::retriable(text)
            }
        }
        other => Failure::retriable(other.to_string()),
    }
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Inner {
    async fn partition_of(&mut self, topic: &str, key: &str) -> Result<(String, i32), Failure> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Failure::retriable("not connected"))?;
        let n = match self.topics.get(topic) {
            Some(n) => *n,
            None => {
                let mut found = client
                    .list_topics()
                    .await
                    .map_err(|e| classify(&e))?
                    .into_iter()
                    .find(|t| t.name == topic)
                    .map(|t| t.partitions.len() as i32);
                if found.is_none() && self.s.create_topic {
                    let ctl = client.controller_client().map_err(|e| classify(&e))?;
                    match ctl.create_topic(topic, 1, 1, 5_000).await {
                        Ok(()) => found = Some(1),
                        Err(KafkaError::ServerError {
                            protocol_error: ProtocolError::TopicAlreadyExists,
                            ..
                        }) => found = Some(1),
                        Err(e) => return Err(classify(&e)),
                    }
                }
                let Some(n) = found.filter(|n| *n > 0) else {
                    return Err(Failure::auth(format!(
                        "topic {topic} does not exist (create it, or set create_topic = true)"
                    )));
                };
                self.topics.insert(topic.to_string(), n);
                n
            }
        };
        let p = (fnv1a(key) % n as u32) as i32;
        let id = (topic.to_string(), p);
        if !self.partitions.contains_key(&id) {
            let pc = client
                .partition_client(topic, p, UnknownTopicHandling::Retry)
                .await
                .map_err(|e| classify(&e))?;
            self.partitions.insert(id.clone(), pc);
        }
        Ok(id)
    }

    async fn send_async(&mut self, batch: &[Message]) -> Result<(), Failure> {
        // Topic and key of every result, rendered once; runs of equal ones become one request.
        let routes: Vec<(String, String)> = batch
            .iter()
            .map(|m| {
                (
                    m.topic(&self.s.topic, &self.s.events_topic, &self.run.pipeline),
                    self.s.key.render(&self.run.pipeline, &m.stream),
                )
            })
            .collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut i = 0;
        while i < batch.len() {
            let (topic, key) = &routes[i];
            let id = self
                .partition_of(topic, key)
                .await
                .map_err(|f| f.progress(i, i))?;
            let j = i + routes[i..].iter().take_while(|r| *r == &routes[i]).count();
            let records = batch[i..j]
                .iter()
                .map(|m| Record {
                    key: Some(key.as_bytes().to_vec()),
                    value: Some(m.payload.as_bytes().to_vec()),
                    headers: BTreeMap::new(),
                    timestamp: DateTime::from_timestamp_millis(now_ms).unwrap_or_default(),
                })
                .collect();
            let pc = &self.partitions[&id];
            match tokio::time::timeout(
                self.run.timeout,
                pc.produce(records, Compression::NoCompression),
            )
            .await
            {
                Ok(Ok(_offsets)) => i = j,
                Ok(Err(e)) => {
                    let mut f = classify(&e).progress(i, j);
                    f.rejected = j - i;
                    return Err(f);
                }
                Err(_) => {
                    return Err(
                        Failure::retriable("timed out waiting for the produce response")
                            .progress(i, j),
                    );
                }
            }
        }
        Ok(())
    }
}

impl Transport for KafkaSink {
    fn connect(&mut self) -> Result<(), Failure> {
        let s = &self.inner.s;
        let run = &self.inner.run;
        let brokers = s.brokers.iter().map(ToString::to_string).collect();
        let mut b = ClientBuilder::new(brokers)
            .client_id(format!("poolpipe-{}", run.pipeline))
            .backoff_config(BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
                deadline: Some(run.timeout),
            });
        if let Some(l) = &s.login {
            b = b.sasl_config(SaslConfig::Plain(Credentials::new(
                l.username.clone(),
                l.password.expose().to_string(),
            )));
        }
        let timeout = run.timeout;
        let client = self.rt.block_on(async {
            match tokio::time::timeout(timeout, b.build()).await {
                Ok(r) => r.map_err(|e| classify(&e)),
                Err(_) => Err(Failure::retriable("timed out connecting")),
            }
        })?;
        self.inner.client = Some(client);
        Ok(())
    }

    fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
        if self.inner.client.is_none() {
            self.connect()?;
        }
        self.rt.block_on(self.inner.send_async(batch))
    }

    fn disconnect(&mut self) {
        self.inner.partitions.clear();
        self.inner.topics.clear();
        self.inner.client = None;
    }
}
