//! Redis Streams: one `XADD key MAXLEN ~ n * result <json> stream <name> seq <n>` per result,
//! pipelined per batch. A batch is delivered once Redis answered every XADD with an entry id.

pub mod config;

use redis::{ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisConnectionInfo};

use super::delivery::{Failure, FailureKind, Message, Transport};
use super::settings::SinkRun;
pub use config::*;

/// The Redis transport.
pub struct RedisSink {
    s: RedisSettings,
    run: SinkRun,
    conn: Option<redis::Connection>,
}

impl RedisSink {
    /// A transport; connects on first use.
    pub fn new(s: RedisSettings, run: SinkRun) -> Self {
        Self { s, run, conn: None }
    }
}

fn classify(e: &redis::RedisError) -> Failure {
    let code = e.code().unwrap_or("");
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
    {
        return Failure::auth(format!(
            "the server refused the credentials ({})",
            if code.is_empty() {
                "authentication failed"
            } else {
                code
            }
        ));
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            code,
            "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY"
        )
    {
        return Failure::retriable(e.to_string());
    }
    if matches!(e.kind(), ErrorKind::Server(_)) {
        // WRONGTYPE, OOM command not allowed, ...: these results will not go in.
        return Failure {
            kind: FailureKind::Rejected,
            ..Failure::retriable(e.to_string())
        };
    }
    Failure::retriable(e.to_string())
}

impl Transport for RedisSink {
    fn connect(&mut self) -> Result<(), Failure> {
        let mut settings = RedisConnectionInfo::default().set_db(self.s.db);
        if let Some(l) = &self.s.login {
            if !l.username.is_empty() {
                settings = settings.set_username(&l.username);
            }
            settings = settings.set_password(l.password.expose());
        }
        let info = ConnectionAddr::Tcp(self.s.addr.host.clone(), self.s.addr.port)
            .into_connection_info()
            .map_err(|e| Failure::retriable(e.to_string()))?
            .set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| classify(&e))?;
        let conn = client
            .get_connection_with_timeout(self.run.timeout)
            .map_err(|e| classify(&e))?;
        let t = Some(self.run.timeout);
        conn.set_read_timeout(t)
            .and_then(|()| conn.set_write_timeout(t))
            .map_err(|e| classify(&e))?;
        self.conn = Some(conn);
        Ok(())
    }

    fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
        if self.conn.is_none() {
            self.connect()?;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failure::retriable("not connected"));
        };
        let mut pipe = redis::pipe();
        for m in batch {
            let key = m.topic(&self.s.key, &self.s.events_key, &self.run.pipeline);
            let cmd = pipe.cmd("XADD").arg(key);
            if self.s.maxlen > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.s.maxlen);
            }
            cmd.arg("*")
                .arg("result")
                .arg(&*m.payload)
                .arg("stream")
                .arg(&*m.stream)
                .arg("seq")
                .arg(m.seq);
        }
        match pipe.query::<Vec<String>>(conn) {
            Ok(ids) if ids.len() == batch.len() => Ok(()),
            Ok(ids) => Err(Failure::retriable(format!(
                "{} entry ids for {} XADDs",
                ids.len(),
                batch.len()
            ))
            .progress(0, batch.len())),
            Err(e) => {
                let mut f = classify(&e).progress(0, batch.len());
                if f.kind == FailureKind::Rejected {
                    f.rejected = batch.len();
                }
                Err(f)
            }
        }
    }

    fn disconnect(&mut self) {
        self.conn = None;
    }
}
