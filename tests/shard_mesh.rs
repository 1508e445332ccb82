//! The shard mesh moves `Bytes` between executors without copying the octets: the receiving
//! shard sees the very allocation the sending shard filled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::relay::{ChannelRef, Envelope};
use apexd::shard::mesh::{self, Refused, ShardMesh, ShardMsg};
use bytes::Bytes;

fn deliver(payload: Bytes) -> ShardMsg {
    ShardMsg::Relay(Envelope::Deliver {
        at: ChannelRef {
            shard: 1,
            conn: 0,
            channel: 1,
        },
        payload,
        report: None,
    })
}

fn payload_of(msg: ShardMsg) -> Bytes {
    match msg {
        ShardMsg::Relay(Envelope::Deliver { payload, .. }) => payload,
        other => panic!("unexpected {other:?}"),
    }
}
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

#[test]
fn bytes_cross_shards_without_a_copy() {
    let builder = mesh::builder(2, 16);
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(2))
        .io_memory(256 * 1024)
        .ring_depth(64)
        .on_all_shards(move || {
            let builder = builder.clone();
            async move {
                let mut mesh = ShardMesh::join(builder).await.unwrap();
                assert_eq!(mesh.shards(), 2);
                if mesh.shard_id() == 0 {
                    let payload = Bytes::from(vec![0xA5u8; 4096]);
                    let address = payload.as_ptr() as usize;
                    mesh.send(1, deliver(payload)).await.unwrap();
                    (address, 0)
                } else {
                    let (from, receiver) = mesh.receivers.streams().pop().unwrap();
                    let payload = payload_of(receiver.recv().await.unwrap());
                    assert_eq!((from, payload.len()), (0, 4096));
                    assert!(payload.iter().all(|b| *b == 0xA5));
                    (payload.as_ptr() as usize, 1)
                }
            }
        })
        .unwrap();
    let mut results: Vec<(usize, usize)> =
        handles.join_all().into_iter().map(|r| r.unwrap()).collect();
    results.sort_by_key(|(_, shard)| *shard);
    assert_eq!(
        results[0].0, results[1].0,
        "the receiver holds the sender's allocation"
    );
}

#[test]
fn a_full_queue_hands_the_message_back() {
    let builder = mesh::builder(2, 1);
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(2))
        .io_memory(256 * 1024)
        .ring_depth(64)
        .on_all_shards(move || {
            let builder = builder.clone();
            async move {
                let mesh = ShardMesh::join(builder).await.unwrap();
                if mesh.shard_id() == 0 {
                    mesh.try_send(1, deliver(Bytes::from_static(b"one")))
                        .unwrap();
                    // Capacity 1: the second message comes back intact, nothing is dropped.
                    let Refused::Full(back) = mesh
                        .try_send(1, deliver(Bytes::from_static(b"two")))
                        .unwrap_err()
                    else {
                        panic!("a full queue reports Full")
                    };
                    assert_eq!(&payload_of(back)[..], b"two");
                }
                // Keep both shards alive until the sender has checked.
                glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .unwrap();
    for r in handles.join_all() {
        r.unwrap();
    }
}
