//! The shard mesh moves `Bytes` between executors without copying the octets: the receiving
//! shard sees the very allocation the sending shard filled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::relay::{ChannelRef, ConnId, Envelope};
use apexd::shard::mesh::{self, Refused, ShardMesh, ShardMsg};
use bytes::Bytes;

fn deliver(payload: Bytes) -> ShardMsg {
    ShardMsg::Relay(Envelope::Deliver {
        at: ChannelRef {
            shard: 1,
            conn: ConnId::from_raw(0),
            channel: 1,
        },
        payload,
        report: None,
        stored: None,
        source: None,
        accepted_us: 0,
    })
}

fn payload_of(msg: ShardMsg) -> Bytes {
    match msg {
        ShardMsg::Relay(Envelope::Deliver { payload, .. }) => payload,
        other => panic!("unexpected {other:?}"),
    }
}
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs `body` on `shards` unpinned executors, each joined to a mesh of queues holding
/// `capacity` messages; returns what each returned, in shard order.
fn on_mesh<T, Fut>(shards: usize, capacity: usize, body: fn(ShardMesh) -> Fut) -> Vec<T>
where
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let plan = mesh::plan(shards, capacity);
    let next = Arc::new(AtomicUsize::new(0));
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(shards))
        .io_memory(256 * 1024)
        .ring_depth(64)
        .on_all_shards(move || {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let ends = plan.take(index).expect("one set of ends per shard");
            async move {
                let mesh = ShardMesh::join(ends).await;
                let shard = mesh.shard_id();
                (shard, body(mesh).await)
            }
        })
        .unwrap();
    let mut results: Vec<(usize, T)> = handles.join_all().into_iter().map(|r| r.unwrap()).collect();
    results.sort_by_key(|(shard, _)| *shard);
    results.into_iter().map(|(_, t)| t).collect()
}

#[test]
fn bytes_cross_shards_without_a_copy() {
    let addresses = on_mesh(2, 16, |mut mesh| async move {
        assert_eq!(mesh.shards(), 2);
        if mesh.shard_id() == 0 {
            let payload = Bytes::from(vec![0xA5u8; 4096]);
            let address = payload.as_ptr() as usize;
            mesh.send(1, deliver(payload)).await.unwrap();
            address
        } else {
            let (from, receiver) = mesh.take_receivers().pop().unwrap();
            let payload = payload_of(receiver.recv().await.unwrap());
            assert_eq!((from, payload.len()), (0, 4096));
            assert!(payload.iter().all(|b| *b == 0xA5));
            payload.as_ptr() as usize
        }
    });
    assert_eq!(
        addresses[0], addresses[1],
        "the receiver holds the sender's allocation"
    );
}

#[test]
fn a_full_queue_hands_the_message_back() {
    on_mesh(2, 1, |mesh| async move {
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
    });
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

/// Payloads each shard sends to each other shard in `three_shards_exchange_in_order_both_ways`.
const EXCHANGED: usize = 1_000;

#[test]
fn three_shards_exchange_in_order_both_ways() {
    // Every ordered pair of shards has its own queue: each shard sends numbered payloads to each
    // other shard, and each receiver sees every sender's sequence complete and in order.
    let received = on_mesh(3, 64, |mut mesh| async move {
        let me = mesh.shard_id();
        let readers: Vec<_> = mesh
            .take_receivers()
            .into_iter()
            .map(|(from, receiver)| {
                glommio::spawn_local(async move {
                    let mut next = 0usize;
                    while next < EXCHANGED {
                        let payload = payload_of(receiver.recv().await.unwrap());
                        assert_eq!(payload, Bytes::from(format!("{from}:{next}")));
                        next += 1;
                    }
                    next
                })
            })
            .collect();
        for i in 0..EXCHANGED {
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
    });
    assert_eq!(
        received,
        vec![2 * EXCHANGED; 3],
        "every payload from both peers"
    );
}
