//! The shard mesh moves `Bytes` between executors without copying the octets: the receiving
//! shard sees the very allocation the sending shard filled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apexd::shard::mesh::{self, ShardMesh, ShardMsg};
use bytes::Bytes;
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
                    mesh.send(1, ShardMsg::Envelope { from: 0, payload })
                        .await
                        .unwrap();
                    (address, 0)
                } else {
                    let (from, receiver) = mesh.receivers.streams().pop().unwrap();
                    let ShardMsg::Envelope {
                        from: sender,
                        payload,
                    } = receiver.recv().await.unwrap();
                    assert_eq!((from, sender, payload.len()), (0, 0, 4096));
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
                    let first = ShardMsg::Envelope {
                        from: 0,
                        payload: Bytes::from_static(b"one"),
                    };
                    let second = ShardMsg::Envelope {
                        from: 0,
                        payload: Bytes::from_static(b"two"),
                    };
                    mesh.try_send(1, first).unwrap();
                    // Capacity 1: the second message comes back intact, nothing is dropped.
                    let ShardMsg::Envelope { payload, .. } = mesh.try_send(1, second).unwrap_err();
                    assert_eq!(&payload[..], b"two");
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
