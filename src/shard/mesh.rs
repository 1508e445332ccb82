//! The shard-to-shard message mesh: one bounded lock-free SPSC queue per ordered pair of shards
//! (glommio's `shared_channel`), carrying [`ShardMsg`]s whose payloads are `Bytes`, so a message
//! crosses shards by moving a reference, never by copying its octets.
//!
//! A full queue hands the message back to the sender ([`ShardMesh::try_send`]) or makes the
//! sender wait ([`ShardMesh::send`]): backpressure, never a silent drop.
//!
//! The queues are made up front on the starting thread ([`plan`]) and each shard takes its own
//! ends ([`MeshPlan::take`]): every end is moved to exactly one executor thread and never
//! cloned. (glommio's `channel_mesh` builder is cloned into every executor and shares an `Rc`
//! among them; its reference count is then updated from several threads at once, which
//! corrupted the heap of multi-shard relays. This module replaces it.)

use std::sync::{Arc, Mutex};

use apex_proto::apex::relay::Envelope;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};

/// What shards send each other.
#[derive(Debug)]
pub enum ShardMsg {
    /// An envelope for the receiving shard's relay; its payloads share memory with the
    /// sending shard's read buffer.
    Relay(Envelope),
}

/// The queues of a mesh of `shards` shards, before the shards take their ends.
#[derive(Debug)]
pub struct MeshPlan {
    shards: usize,
    ends: Mutex<Vec<Option<ShardEnds>>>,
}

/// One shard's unconnected ends: a sender to every other shard and a receiver from each.
#[derive(Debug)]
pub struct ShardEnds {
    shard: usize,
    shards: usize,
    senders: Vec<(usize, SharedSender<ShardMsg>)>,
    receivers: Vec<(usize, SharedReceiver<ShardMsg>)>,
}

/// Makes the queues of a full mesh of `shards` shards, `capacity` messages each.
pub fn plan(shards: usize, capacity: usize) -> Arc<MeshPlan> {
    let mut ends: Vec<ShardEnds> = (0..shards)
        .map(|shard| ShardEnds {
            shard,
            shards,
            senders: Vec::new(),
            receivers: Vec::new(),
        })
        .collect();
    for from in 0..shards {
        for to in (0..shards).filter(|to| *to != from) {
            let (sender, receiver) = shared_channel::new_bounded(capacity);
            ends[from].senders.push((to, sender));
            ends[to].receivers.push((from, receiver));
        }
    }
    Arc::new(MeshPlan {
        shards,
        ends: Mutex::new(ends.into_iter().map(Some).collect()),
    })
}

impl MeshPlan {
    /// Number of shards in the mesh.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Shard `shard`'s ends; `None` when out of range or already taken.
    pub fn take(&self, shard: usize) -> Option<ShardEnds> {
        // A poisoned lock only means another shard panicked while taking its ends; the vector
        // itself is still consistent.
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        ends.get_mut(shard).and_then(Option::take)
    }
}

/// One shard's connected ends of the mesh.
#[derive(Debug)]
pub struct ShardMesh {
    shard: usize,
    shards: usize,
    /// By destination shard; `None` at this shard's own index.
    senders: Vec<Option<ConnectedSender<ShardMsg>>>,
    receivers: Vec<(usize, ConnectedReceiver<ShardMsg>)>,
}

impl ShardMesh {
    /// Connects this shard's ends. Every shard of the mesh must call it: a connection completes
    /// when both of its shards have connected, so the ends are connected concurrently.
    pub async fn join(ends: ShardEnds) -> ShardMesh {
        let senders: Vec<_> = ends
            .senders
            .into_iter()
            .map(|(to, sender)| glommio::spawn_local(async move { (to, sender.connect().await) }))
            .collect();
        let receivers: Vec<_> = ends
            .receivers
            .into_iter()
            .map(|(from, receiver)| {
                glommio::spawn_local(async move { (from, receiver.connect().await) })
            })
            .collect();
        let mut connected_senders: Vec<Option<ConnectedSender<ShardMsg>>> =
            (0..ends.shards).map(|_| None).collect();
        for task in senders {
            let (to, sender) = task.await;
            connected_senders[to] = Some(sender);
        }
        let mut connected_receivers = Vec::with_capacity(receivers.len());
        for task in receivers {
            connected_receivers.push(task.await);
        }
        ShardMesh {
            shard: ends.shard,
            shards: ends.shards,
            senders: connected_senders,
            receivers: connected_receivers,
        }
    }

    /// This shard's index in the mesh.
    pub fn shard_id(&self) -> usize {
        self.shard
    }

    /// Number of shards in the mesh.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The receiving ends, by source shard (taken once, by the shard's receive loops).
    pub fn take_receivers(&mut self) -> Vec<(usize, ConnectedReceiver<ShardMsg>)> {
        std::mem::take(&mut self.receivers)
    }

    fn sender(&self, to: usize) -> Option<&ConnectedSender<ShardMsg>> {
        self.senders.get(to).and_then(Option::as_ref)
    }

    /// Sends without waiting; a full or closed queue returns the message.
    #[allow(clippy::result_large_err)] // the refused message comes back by value: nothing is lost
    pub fn try_send(&self, to: usize, msg: ShardMsg) -> Result<(), Refused> {
        match self.sender(to) {
            Some(sender) => sender.try_send(msg).map_err(Refused::from),
            None => Err(Refused::Closed(msg)),
        }
    }

    /// Sends, waiting while the queue is full; a closed queue returns the message. At most one
    /// task may send to a given shard (glommio's sender checks for room, then pushes).
    #[allow(clippy::result_large_err)] // the refused message comes back by value: nothing is lost
    pub async fn send(&self, to: usize, msg: ShardMsg) -> Result<(), Refused> {
        match self.sender(to) {
            Some(sender) => sender.send(msg).await.map_err(Refused::from),
            None => Err(Refused::Closed(msg)),
        }
    }
}

/// Why the mesh did not take a message. glommio hands the message back for a full or closed
/// queue, so nothing is lost silently.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full: retry, or wait with [`ShardMesh::send`].
    Full(ShardMsg),
    /// The peer shard is gone.
    Closed(ShardMsg),
    /// Any other failure (the message could not be recovered).
    Other(String),
}

impl Refused {
    /// The message, when glommio returned it.
    pub fn into_message(self) -> Option<ShardMsg> {
        match self {
            Refused::Full(m) | Refused::Closed(m) => Some(m),
            Refused::Other(_) => None,
        }
    }
}

impl From<glommio::GlommioError<ShardMsg>> for Refused {
    fn from(e: glommio::GlommioError<ShardMsg>) -> Self {
        match e {
            glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => {
                Refused::Full(m)
            }
            glommio::GlommioError::Closed(glommio::ResourceType::Channel(m)) => Refused::Closed(m),
            other => Refused::Other(other.to_string()),
        }
    }
}
