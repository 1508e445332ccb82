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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Each executor of the pool takes the ends of the next shard index.
fn ends_taker(plan: Arc<mesh::MeshPlan>) -> impl Fn() -> mesh::ShardEnds + Clone {
    let next = Arc::new(AtomicUsize::new(0));
    move || {
        let index = next.fetch_add(1, Ordering::Relaxed);
        plan.take(index).expect("one set of ends per shard")
    }
}

#[test]
fn bytes_cross_shards_without_a_copy() {
    let take = ends_taker(mesh::plan(2, 16));
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(2))
        .io_memory(256 * 1024)
        .ring_depth(64)
        .on_all_shards(move || {
            let ends = take();
            async move {
                let mut mesh = ShardMesh::join(ends).await;
                assert_eq!(mesh.shards(), 2);
                if mesh.shard_id() == 0 {
                    let payload = Bytes::from(vec![0xA5u8; 4096]);
                    let address = payload.as_ptr() as usize;
                    mesh.send(1, deliver(payload)).await.unwrap();
                    (address, 0)
                } else {
                    let (from, receiver) = mesh.take_receivers().pop().unwrap();
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
    let take = ends_taker(mesh::plan(2, 1));
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(2))
        .io_memory(256 * 1024)
        .ring_depth(64)
        .on_all_shards(move || {
            let ends = take();
            async move {
                let mesh = ShardMesh::join(ends).await;
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

#[test]
fn each_shard_takes_its_own_ends_once() {
    let plan = mesh::plan(3, 4);
    assert_eq!(plan.shards(), 3);
    for shard in 0..3 {
        assert!(plan.take(shard).is_some(), "shard {shard}'s ends");
        assert!(plan.take(shard).is_none(), "shard {shard}'s ends twice");
    }
    assert!(plan.take(3).is_none(), "no shard 3 in a 3-shard mesh");
}

#[test]
fn three_shards_exchange_in_order_both_ways() {
    // Every ordered pair of shards has its own queue: each shard sends 1,000 numbered payloads
    // to each other shard, and each receiver sees every sender's sequence complete and in order.
    const N: usize = 1_000;
    let take = ends_taker(mesh::plan(3, 64));
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(3))
        .io_memory(256 * 1024)
        .ring_depth(64)
        .on_all_shards(move || {
            let ends = take();
            async move {
                let mut mesh = ShardMesh::join(ends).await;
                let me = mesh.shard_id();
                let receivers = mesh.take_receivers();
                let readers: Vec<_> = receivers
                    .into_iter()
                    .map(|(from, receiver)| {
                        glommio::spawn_local(async move {
                            let mut next = 0usize;
                            while next < N {
                                let payload = payload_of(receiver.recv().await.unwrap());
                                assert_eq!(payload, Bytes::from(format!("{from}:{next}")));
                                next += 1;
                            }
                            next
                        })
                    })
                    .collect();
                for i in 0..N {
                    for to in (0..3).filter(|to| *to != me) {
                        mesh.send(to, deliver(Bytes::from(format!("{me}:{i}"))))
                            .await
                            .unwrap();
                    }
                }
                let mut got = 0;
                for reader in readers {
                    got += reader.await;
                }
                // Stay connected until every peer has read what this shard sent.
                glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
                got
            }
        })
        .unwrap();
    for r in handles.join_all() {
        assert_eq!(r.unwrap(), 2 * N, "every payload from both peers");
    }
}
