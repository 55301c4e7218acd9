//! MQTT 3.1.1 through rumqttc. QoS 1: a batch is delivered once the broker has sent a PUBACK for
//! every message of it. The event loop is driven only while a batch is in flight; keep-alive
//! between batches is covered by reconnecting when a send finds the connection gone.

pub mod config;

use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, MqttOptions,
    Outgoing, QoS, TlsConfiguration, Transport as MqttTransport,
};

use super::delivery::{Failure, Message, Transport};
use super::settings::SinkRun;
pub use config::*;

/// Topic of the no-op UNSUBSCRIBE that flushes our TCP ACK after a batch (see `send`).
const NUDGE_TOPIC: &str = "poolpipe/nudge";

/// The MQTT transport.
pub struct MqttSink {
    s: MqttSettings,
    run: SinkRun,
    rt: tokio::runtime::Runtime,
    conn: Option<(AsyncClient, EventLoop)>,
}

impl MqttSink {
    /// A transport; connects on first use.
    pub fn new(s: MqttSettings, run: SinkRun) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            s,
            run,
            rt,
            conn: None,
        })
    }

    fn options(&self) -> Result<MqttOptions, Failure> {
        let mut o = MqttOptions::new(&self.s.client_id, &self.s.addr.host, self.s.addr.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight((self.run.batch + 2).clamp(1, u16::MAX as usize) as u16)
            .set_max_packet_size(1 << 20, 16 << 20);
        if let Some(l) = &self.s.login {
            o.set_credentials(&l.username, l.password.expose());
        }
        if let Some(t) = &self.s.tls {
            super::install_crypto_provider();
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| {
                    Failure::auth(format!("cannot read TLS file {}: {e}", p.display()))
                })
            };
            let client_auth = match &t.client {
                Some((c, k)) => Some((read(c)?, read(k)?)),
                None => None,
            };
            o.set_transport(MqttTransport::Tls(TlsConfiguration::Simple {
                ca: read(&t.ca)?,
                alpn: None,
                client_auth,
            }));
        }
        Ok(o)
    }
}

fn classify(e: &ConnectionError) -> Failure {
    match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => Failure::auth(format!(
            "the broker refused the credentials ({})",
            match e {
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) =>
                    "not authorized",
                _ => "bad user name or password",
            }
        )),
        ConnectionError::Tls(t) => Failure::auth(format!("TLS: {t}")),
        other => Failure::retriable(other.to_string()),
    }
}

impl Transport for MqttSink {
    fn connect(&mut self) -> Result<(), Failure> {
        let opts = self.options()?;
        let (client, mut events) = AsyncClient::new(opts, self.run.batch.max(1) + 8);
        // Our side sends without Nagle. A broker that keeps Nagle on (mosquitto's default) still
        // holds the batch's last PUBACKs until our delayed ACK, ~40 ms per batch: see the README.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(self.run.timeout.as_secs().max(1));
        events.set_network_options(net);
        let timeout = self.run.timeout;
        self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, events.poll()).await {
                    Err(_) => return Err(Failure::retriable("timed out connecting")),
                    Ok(Err(e)) => return Err(classify(&e)),
                    Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => return Ok(()),
                    Ok(Ok(_)) => {}
                }
            }
        })?;
        self.conn = Some((client, events));
        Ok(())
    }

    fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
        if self.conn.is_none() {
            self.connect()?;
        }
        let Some((client, events)) = self.conn.as_mut() else {
            return Err(Failure::retriable("not connected"));
        };
        let qos = if self.s.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        for m in batch {
            let topic = m.topic(&self.s.topic, &self.s.events_topic, &self.run.pipeline);
            if let Err(e) = client.try_publish(topic, qos, false, m.payload.as_bytes().to_vec()) {
                return Err(Failure::retriable(format!("queueing a publish: {e}")));
            }
        }
        let timeout = self.run.timeout;
        self.rt.block_on(async {
            let deadline = Instant::now() + timeout;
            // The i-th outgoing publish is batch[i]; acks name packet ids.
            let mut pkids: Vec<u16> = Vec::with_capacity(batch.len());
            let mut acked = vec![false; batch.len()];
            let mut done = 0usize; // leading acknowledged
            let mut nudged = false;
            loop {
                let sent = pkids.len();
                while done < batch.len() && acked[done] {
                    done += 1;
                }
                let all_written = sent == batch.len();
                if done == batch.len() || (qos == QoS::AtMostOnce && all_written) {
                    return Ok(());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let fail = |msg: String| {
                    let acked_n = if qos == QoS::AtMostOnce { sent } else { done };
                    Err(Failure::retriable(msg).progress(acked_n, sent))
                };
                // Once the whole batch is written, wait briefly; if PUBACKs are still missing,
                // send one harmless packet (an UNSUBSCRIBE of a topic never subscribed) so that
                // our TCP ACK goes out now: a broker with Nagle on (mosquitto's default) holds
                // its last PUBACKs until then, which otherwise costs a delayed ACK (~40 ms).
                let wait = if all_written && !nudged {
                    left.min(Duration::from_millis(1))
                } else {
                    left
                };
                let polled = tokio::time::timeout(wait, events.poll()).await;
                if polled.is_err() && wait < left {
                    nudged = true;
                    let _ = client.try_unsubscribe(NUDGE_TOPIC);
                    continue;
                }
                match polled {
                    Err(_) => return fail("timed out waiting for PUBACKs".into()),
                    Ok(Err(e)) => {
                        let acked_n = if qos == QoS::AtMostOnce { 0 } else { done };
                        return Err(classify(&e).progress(acked_n, sent));
                    }
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => pkids.push(pkid),
                    Ok(Ok(Event::Incoming(Incoming::PubAck(a)))) => {
                        if let Some(i) = pkids.iter().rposition(|p| *p == a.pkid) {
                            acked[i] = true;
                        }
                    }
                    Ok(Ok(_)) => {}
                }
            }
        })
    }

    fn disconnect(&mut self) {
        self.conn = None;
    }

    fn idle(&mut self) {
        // Let the event loop send PINGREQs and read what the broker sent; a dead connection
        // shows here and is replaced before the next batch.
        let Some((_, events)) = self.conn.as_mut() else {
            return;
        };
        let dead = self.rt.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_millis(2), events.poll()).await {
                    Err(_) => return false,
                    Ok(Err(_)) => return true,
                    Ok(Ok(_)) => {}
                }
            }
        });
        if dead {
            self.conn = None;
        }
    }
}
