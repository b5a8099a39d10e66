//! The network's events on their way to the node, in two bounded queues: heartbeat gossip, and everything
//! else. Heartbeats are most of the gossip (every node, every few seconds, to everyone) and each one is
//! superseded by the same node's next; round announcements, deltas, commits, attestations and fetch
//! requests are few, and each one matters. The node takes from the queue of everything else before the
//! heartbeats, and a full heartbeat queue drops only heartbeats: a node that falls behind lets heartbeats go
//! and still hears its rounds. (At 64 nodes in one process on two cores, thousands of dropped events each
//! took the round announcements with them; the main cause was the daemon's stalled event task, see
//! `daemon::run_events`, and this split keeps the heartbeats from doing the same to a node that is merely busy.)

use tokio::sync::mpsc;

use super::NetEvent;

/// The receiving end: what the node reads its network events from.
pub struct Events {
    /// Everything but heartbeat gossip.
    main: mpsc::Receiver<NetEvent>,
    /// Heartbeat gossip.
    heartbeats: mpsc::Receiver<NetEvent>,
}

impl Events {
    /// The next event: one from the main queue while it has any, else a heartbeat. `None` once the event loop
    /// is gone and both queues are drained. Cancel-safe (an event is never lost to a `select!`).
    pub async fn recv(&mut self) -> Option<NetEvent> {
        tokio::select! {
            biased;
            Some(event) = self.main.recv() => Some(event),
            Some(event) = self.heartbeats.recv() => Some(event),
            else => None,
        }
    }
}

/// The sending end, in the event loop: which queue an event goes to, and whether it fit.
pub(crate) struct EventSenders {
    main: mpsc::Sender<NetEvent>,
    heartbeats: mpsc::Sender<NetEvent>,
    /// The run's heartbeat topic name.
    heartbeat_topic: String,
}

/// Why an event was not queued.
pub(crate) enum NotQueued {
    /// Its queue was full: the node is that far behind.
    Full {
        /// The event, given back.
        event: NetEvent,
        /// It was a heartbeat.
        heartbeat: bool,
    },
    /// The node stopped reading.
    Closed(NetEvent),
}

impl EventSenders {
    /// Queues `event` without waiting.
    pub(crate) fn try_send(&self, event: NetEvent) -> Result<(), NotQueued> {
        let heartbeat =
            matches!(&event, NetEvent::Gossip { topic, .. } if *topic == self.heartbeat_topic);
        let queue = if heartbeat {
            &self.heartbeats
        } else {
            &self.main
        };
        queue.try_send(event).map_err(|e| match e {
            mpsc::error::TrySendError::Full(event) => NotQueued::Full { event, heartbeat },
            mpsc::error::TrySendError::Closed(event) => NotQueued::Closed(event),
        })
    }
}

/// Two queues of `capacity` events each; gossip on `heartbeat_topic` goes to the second.
pub(crate) fn channel(capacity: usize, heartbeat_topic: String) -> (EventSenders, Events) {
    let (main_tx, main) = mpsc::channel(capacity);
    let (heartbeats_tx, heartbeats) = mpsc::channel(capacity);
    (
        EventSenders {
            main: main_tx,
            heartbeats: heartbeats_tx,
            heartbeat_topic,
        },
        Events { main, heartbeats },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;
    use libp2p::gossipsub::MessageId;

    fn gossip(topic: &str, byte: u8) -> NetEvent {
        NetEvent::Gossip {
            source: PeerId::random(),
            author: None,
            id: MessageId::new(&[byte]),
            topic: topic.into(),
            data: vec![byte],
        }
    }

    fn data(event: Option<NetEvent>) -> Vec<u8> {
        match event {
            Some(NetEvent::Gossip { data, .. }) => data,
            other => panic!("expected gossip, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn heartbeats_wait_behind_the_rest_and_only_they_are_dropped_when_full() {
        let (tx, mut rx) = channel(2, "mana/run/heartbeats".into());
        for byte in [1, 2] {
            assert!(tx.try_send(gossip("mana/run/heartbeats", byte)).is_ok());
        }
        // The heartbeat queue is full: a third heartbeat is refused, a round message still fits.
        match tx.try_send(gossip("mana/run/heartbeats", 3)) {
            Err(NotQueued::Full { heartbeat, .. }) => assert!(heartbeat),
            _ => panic!("a third heartbeat must not fit in a queue of two"),
        }
        assert!(tx.try_send(gossip("mana/run/rounds", 10)).is_ok());
        assert!(tx.try_send(gossip("mana/run/deltas", 11)).is_ok());
        match tx.try_send(gossip("mana/run/rounds", 12)) {
            Err(NotQueued::Full { heartbeat, .. }) => assert!(!heartbeat),
            _ => panic!("the main queue holds two"),
        }
        // The round and delta messages come first, in order, then the heartbeats.
        assert_eq!(data(rx.recv().await), [10]);
        assert_eq!(data(rx.recv().await), [11]);
        assert_eq!(data(rx.recv().await), [1]);
        // A new round message overtakes the heartbeat still waiting.
        assert!(tx.try_send(gossip("mana/run/rounds", 13)).is_ok());
        assert_eq!(data(rx.recv().await), [13]);
        assert_eq!(data(rx.recv().await), [2]);
        drop(tx);
        assert!(rx.recv().await.is_none());
    }
}
