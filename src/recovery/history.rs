//! A link's history in JetStream: one stream per link with `RECOVERY=true`, one subject per
//! session, bounded by `HISTORY_SIZE` messages per session and `HISTORY_TTL_SEC`. Each message
//! is the frame as it was written (with its `"seq"`), its sequence number in a header.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use uuid::Uuid;

use crate::config::Recovery;

/// The header that carries a kept message's sequence number.
const SEQ_HEADER: &str = "Ws-Seq";
/// How long a history operation may take before it counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes one read brings back (a resume's replay is held in memory until written).
pub const MAX_READ_BYTES: usize = 64 * 1024 * 1024;

/// Why a read of the history brought nothing back.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// What was asked for is over [`MAX_READ_BYTES`].
    TooLarge,
    /// JetStream failed or did not answer.
    Unavailable(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge => write!(f, "history: more than {MAX_READ_BYTES} bytes to read"),
            Self::Unavailable(e) => f.write_str(e),
        }
    }
}

/// One link's stream.
pub struct History {
    js: jetstream::Context,
    stream: String,
    /// `<prefix>.<session>` is a session's subject.
    prefix: String,
    pub settings: Recovery,
}

/// A NATS subject token, stream or bucket name part: anything but `[A-Za-z0-9_-]` becomes `_`.
pub fn token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A message being stored: resolves once JetStream has it.
pub type Stored = futures::future::BoxFuture<'static, Result<(), String>>;

impl History {
    /// Creates (or updates) the stream of a link tagged `tag` of `provider` in `lattice`.
    pub async fn open(
        nats: async_nats::Client,
        lattice: &str,
        provider: &str,
        tag: [u8; 8],
        settings: Recovery,
    ) -> Result<Self, String> {
        let js = jetstream::new(nats);
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let stream = format!("WSHISTORY_{}_{}_{tag}", token(lattice), token(provider));
        let prefix = format!(
            "wasmcloud-websocket.{}.{}.history.{tag}",
            token(lattice),
            token(provider)
        );
        let config = stream::Config {
            name: stream.clone(),
            description: Some(
                "wasmcloud-provider-messaging-websocket: messages kept for resuming sessions"
                    .into(),
            ),
            subjects: vec![format!("{prefix}.*")],
            max_messages_per_subject: i64::try_from(settings.history_size).unwrap_or(i64::MAX),
            max_age: settings.history_ttl,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let created = tokio::time::timeout(Duration::from_secs(20), async {
            match js.create_stream(config.clone()).await {
                Ok(_) => Ok(()),
                // It exists with other limits (the link was put again with new ones).
                Err(create) => js
                    .update_stream(config)
                    .await
                    .map(|_| ())
                    .map_err(|update| format!("{create}; update: {update}")),
            }
        })
        .await;
        match created {
            Ok(Ok(())) => Ok(Self {
                js,
                stream,
                prefix,
                settings,
            }),
            Ok(Err(e)) => Err(format!(
                "RECOVERY=true needs JetStream on the lattice's NATS (nats-server -js): {e}"
            )),
            Err(_) => Err("RECOVERY=true: JetStream did not answer within 20 s".to_string()),
        }
    }

    fn subject(&self, session: Uuid) -> String {
        format!("{}.{}", self.prefix, session.simple())
    }

    /// Starts storing message `seq` of `session`: returns once it is on its way (messages of
    /// one session are stored in the order of these calls); the future resolves when stored.
    pub async fn append(&self, session: Uuid, seq: u64, frame: Bytes) -> Result<Stored, String> {
        let mut headers = HeaderMap::new();
        headers.insert(SEQ_HEADER, seq.to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(self.subject(session), headers, frame)
            .await
            .map_err(|e| format!("history: {e}"))?;
        Ok(Box::pin(async move {
            ack.await.map(|_| ()).map_err(|e| format!("history: {e}"))
        }))
    }

    /// The kept messages of `session` with a sequence number above `after`, in order; an
    /// error when they are over [`MAX_READ_BYTES`].
    pub async fn read(&self, session: Uuid, after: u64) -> Result<Vec<(u64, Bytes)>, ReadError> {
        self.read_up_to(session, after, false).await
    }

    /// Like [`History::read`], but over [`MAX_READ_BYTES`] it returns the first of them (at
    /// least one): read on after the last one returned.
    pub async fn read_page(
        &self,
        session: Uuid,
        after: u64,
    ) -> Result<Vec<(u64, Bytes)>, ReadError> {
        self.read_up_to(session, after, true).await
    }

    async fn read_up_to(
        &self,
        session: Uuid,
        after: u64,
        page: bool,
    ) -> Result<Vec<(u64, Bytes)>, ReadError> {
        tokio::time::timeout(OP_TIMEOUT, self.read_all(session, after, page))
            .await
            .map_err(|_| {
                ReadError::Unavailable("history: JetStream did not answer in time".to_string())
            })?
    }

    async fn read_all(
        &self,
        session: Uuid,
        after: u64,
        page: bool,
    ) -> Result<Vec<(u64, Bytes)>, ReadError> {
        let e = |e: &dyn std::fmt::Display| ReadError::Unavailable(format!("history: {e}"));
        let stream = self.js.get_stream(&self.stream).await.map_err(|x| e(&x))?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: self.subject(session),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|x| e(&x))?;
        let pending = usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX);
        let mut kept = Vec::with_capacity(pending.min(self.settings.history_size));
        let (mut seen, mut bytes) = (0, 0usize);
        while seen < pending {
            let mut batch = consumer
                .fetch()
                .max_messages(pending - seen)
                .messages()
                .await
                .map_err(|x| e(&x))?;
            let before = seen;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|x| e(&x))?;
                seen += 1;
                let seq = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(SEQ_HEADER))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                if let Some(seq) = seq.filter(|s| *s > after) {
                    bytes += message.payload.len();
                    if bytes > MAX_READ_BYTES && !(page && kept.is_empty()) {
                        if !page {
                            return Err(ReadError::TooLarge);
                        }
                        seen = pending; // a full page: the caller reads on after it
                        break;
                    }
                    kept.push((seq, message.payload.clone()));
                }
            }
            if seen == before {
                break; // expired meanwhile
            }
        }
        let name = consumer.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
        kept.sort_by_key(|(seq, _)| *seq);
        Ok(kept)
    }

    /// Forgets what `session` kept (it ended).
    pub async fn forget(&self, session: Uuid) {
        let subject = self.subject(session);
        let purged = tokio::time::timeout(OP_TIMEOUT, async {
            let stream = self.js.get_stream(&self.stream).await.ok()?;
            stream.purge().filter(subject).await.ok()
        })
        .await;
        if !matches!(purged, Ok(Some(_))) {
            tracing::debug!(%session, "history not purged (it expires with HISTORY_TTL_SEC)");
        }
    }

    /// Deletes the link's stream (the link is gone).
    pub async fn delete(&self) {
        let _ = tokio::time::timeout(OP_TIMEOUT, self.js.delete_stream(&self.stream)).await;
    }
}
