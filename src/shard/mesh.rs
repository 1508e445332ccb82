//! The shard-to-shard message mesh: one bounded lock-free SPSC queue per ordered pair of shards
//! (glommio's `channel_mesh`), carrying [`ShardMsg`]s whose payloads are `Bytes`, so a message
//! crosses shards by moving a reference, never by copying its octets.
//!
//! A full queue hands the message back to the sender ([`ShardMesh::try_send`]) or makes the
//! sender wait ([`ShardMesh::send`]): backpressure, never a silent drop.

use apex_proto::apex::relay::Envelope;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

/// What shards send each other.
#[derive(Debug)]
pub enum ShardMsg {
    /// An envelope for the receiving shard's relay; its payloads share memory with the
    /// sending shard's read buffer.
    Relay(Envelope),
}

/// Builds the full mesh for `shards` shards with queues of `capacity` messages.
pub fn builder(shards: usize, capacity: usize) -> MeshBuilder<ShardMsg, Full> {
    MeshBuilder::full(shards, capacity)
}

/// One shard's ends of the mesh.
pub struct ShardMesh {
    senders: Senders<ShardMsg>,
    /// Receiving ends, taken by the shard's receive loops.
    pub receivers: Receivers<ShardMsg>,
}

impl ShardMesh {
    /// Joins the mesh; every shard must call it (it waits for all peers).
    pub async fn join(builder: MeshBuilder<ShardMsg, Full>) -> anyhow::Result<ShardMesh> {
        let (senders, receivers) = builder
            .join()
            .await
            .map_err(|e| anyhow::anyhow!("joining the shard mesh failed: {e}"))?;
        Ok(ShardMesh { senders, receivers })
    }

    /// This shard's index in the mesh.
    pub fn shard_id(&self) -> usize {
        self.senders.peer_id()
    }

    /// Number of shards in the mesh.
    pub fn shards(&self) -> usize {
        self.senders.nr_consumers()
    }

    /// Sends without waiting; a full or closed queue returns the message.
    #[allow(clippy::result_large_err)] // the refused message comes back by value: nothing is lost
    pub fn try_send(&self, to: usize, msg: ShardMsg) -> Result<(), Refused> {
        self.senders.try_send_to(to, msg).map_err(Refused::from)
    }

    /// Sends, waiting while the queue is full; a closed queue returns the message.
    #[allow(clippy::result_large_err)] // the refused message comes back by value: nothing is lost
    pub async fn send(&self, to: usize, msg: ShardMsg) -> Result<(), Refused> {
        self.senders.send_to(to, msg).await.map_err(Refused::from)
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
