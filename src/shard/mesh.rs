//! The shard-to-shard message mesh: one bounded lock-free SPSC queue per ordered pair of shards
//! (glommio's `channel_mesh`), carrying [`ShardMsg`]s whose payloads are `Bytes`, so a message
//! crosses shards by moving a reference, never by copying its octets.
//!
//! A full queue hands the message back to the sender ([`ShardMesh::try_send`]) or makes the
//! sender wait ([`ShardMesh::send`]): backpressure, never a silent drop.

use bytes::Bytes;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

/// What shards send each other.
#[derive(Debug)]
pub enum ShardMsg {
    /// An opaque message for the receiving shard's relay.
    Envelope {
        /// Shard that sent it.
        from: usize,
        /// The message; shares memory with the sender's read buffer.
        payload: Bytes,
    },
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
    pub fn try_send(&self, to: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.senders.try_send_to(to, msg).map_err(|e| match e {
            glommio::GlommioError::Closed(glommio::ResourceType::Channel(m))
            | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
            other => unreachable_channel_error(other),
        })
    }

    /// Sends, waiting while the queue is full; a closed queue returns the message.
    pub async fn send(&self, to: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.senders.send_to(to, msg).await.map_err(|e| match e {
            glommio::GlommioError::Closed(glommio::ResourceType::Channel(m))
            | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => m,
            other => unreachable_channel_error(other),
        })
    }
}

/// glommio's channel errors always carry the message back; any other error kind would mean the
/// message is gone, which we refuse to hide.
fn unreachable_channel_error(e: glommio::GlommioError<ShardMsg>) -> ShardMsg {
    tracing::error!(error = %e, "shard mesh lost a message");
    ShardMsg::Envelope {
        from: usize::MAX,
        payload: Bytes::new(),
    }
}
