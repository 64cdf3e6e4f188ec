//! Delivers alerts to the configured webhook: one JSON body per event, in
//! order, signed with the hub's key, retried with doubling waits.
//!
//! Invariant: an event is retried until the receiver answers 2xx or the
//! configured attempts are used up; a given-up event is logged and counted,
//! never silently dropped. A full queue (the receiver far behind) drops the
//! newest event, also logged and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shuyuan_protocol::NodeKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::monitor::Alert;
use crate::config::AlertsConfig;

/// The signature context of webhook bodies: the header
/// `X-Shuyuan-Signature` is the base64 ed25519 signature of the exact body
/// under this context, by the key `X-Shuyuan-Hub` names.
pub const SIGNATURE_CONTEXT: &[u8] = b"shuyuan webhook v1";

/// Events waiting for delivery, at most.
const QUEUE: usize = 1024;

/// Delivery counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Deliveries {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub given_up: AtomicU64,
    pub dropped: AtomicU64,
}

/// Hands alerts to the delivery task.
#[derive(Debug, Clone)]
pub struct Alerts {
    tx: Option<mpsc::Sender<Alert>>,
    pub counts: Arc<Deliveries>,
}

impl Alerts {
    /// Starts the delivery task when a webhook is configured.
    pub fn start(config: &AlertsConfig, key: NodeKey, cancel: CancellationToken) -> Alerts {
        let counts = Arc::new(Deliveries::default());
        let Some(url) = config.webhook.clone() else {
            return Alerts { tx: None, counts };
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(
            url,
            config.clone(),
            key,
            rx,
            counts.clone(),
            cancel,
        ));
        Alerts {
            tx: Some(tx),
            counts,
        }
    }

    pub fn send(&self, alert: Alert) {
        tracing::info!(event = %alert.event, department = %alert.department, feed = ?alert.feed, "{}", alert.detail);
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(alert) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "webhook queue full: alert dropped");
        }
    }
}

async fn deliver(
    url: String,
    config: AlertsConfig,
    key: NodeKey,
    mut rx: mpsc::Receiver<Alert>,
    counts: Arc<Deliveries>,
    cancel: CancellationToken,
) {
    let client = match client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; alerts are only logged");
            return;
        }
    };
    let mut delivery = 0u64;
    loop {
        let alert = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            () = cancel.cancelled() => return,
        };
        delivery += 1;
        let body = match serde_json::to_vec(&alert) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an alert");
                continue;
            }
        };
        let signature =
            data_encoding::BASE64.encode(&key.sign(SIGNATURE_CONTEXT, &body).to_bytes());
        let mut wait = config.retry_after;
        for attempt in 1..=config.attempts {
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-shuyuan-event", &alert.event)
                .header("x-shuyuan-delivery", delivery.to_string())
                .header("x-shuyuan-attempt", attempt.to_string())
                .header("x-shuyuan-hub", key.id().to_string())
                .header("x-shuyuan-signature", &signature)
                .body(body.clone())
                .send()
                .await;
            let failure = match sent {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("the receiver answered {}", r.status())),
                Err(e) => Some(e.to_string()),
            };
            let Some(failure) = failure else {
                counts.delivered.fetch_add(1, Ordering::Relaxed);
                break;
            };
            if attempt == config.attempts {
                counts.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(event = %alert.event, %url, attempts = attempt, error = %failure, detail = %alert.detail, "webhook delivery given up");
                break;
            }
            counts.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event = %alert.event, %url, attempt, error = %failure, retry_in = ?wait, "webhook delivery failed");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
            wait = wait.saturating_mul(2);
        }
    }
}

fn client(config: &AlertsConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(config.timeout)
        .user_agent(shuyuan_protocol::SOFTWARE)
        .build()
}
