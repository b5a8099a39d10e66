//! The coordinator's cap on members per IP address (issue #12, section 4), on a real loopback network with the
//! real roles: a coordinator that counts loopback like any address (`trust_colocated_ips` off) and admits at
//! most 2 members per address, and 3 trainers on 127.0.0.1. Exactly 2 become members and train every round;
//! the third is refused (`not-admitted`) at every heartbeat although the coordinator is connected to it
//! directly, so its address is known: the refusal is the cap's.

mod net_support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use net_support::*;

const TRAINERS: usize = 3;
const PER_IP: usize = 2;
const ROUNDS: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_key_from_one_address_is_refused_and_the_two_admitted_train() {
    let net = RoundNet::start_with(TRAINERS, |name, config| {
        if name == "coordinator" {
            // Loopback counts like any address here (a loopback-only test network trusts it by default).
            config.net.trust_colocated_ips = false;
        }
    })
    .await;
    let conductor = net.conduct_with(ROUNDS, PER_IP, |machine| {
        machine.standing.max_members_per_ip = PER_IP;
    });
    tokio::time::timeout(Duration::from_secs(120), conductor)
        .await
        .expect("the coordinator finishes its rounds in time")
        .expect("coordinator task")
        .expect("coordinator ran");

    let status = net.coordinator.status().await.expect("coordinator status");
    let coord = status.coordinator.expect("a coordinator reports its role");
    assert_eq!(coord.committed_round, Some(ROUNDS));
    assert_eq!(coord.members, PER_IP, "{coord:?}");
    // The third key heartbeats every 500 ms through the whole run (a few seconds), and is refused each time.
    assert!(coord.not_admitted >= 1, "{} refusals", coord.not_admitted);
    // The status says where each member is counted.
    let placed: Vec<&str> = coord
        .standings
        .iter()
        .filter(|m| m.member)
        .filter_map(|m| m.address.as_deref())
        .collect();
    assert_eq!(placed, vec!["127.0.0.1"; PER_IP], "{:?}", coord.standings);

    let trained: Vec<u64> = net
        .statuses()
        .await
        .iter()
        .map(|s| training(s).rounds_trained)
        .collect();
    let full = trained.iter().filter(|&&n| n == ROUNDS).count();
    let none = trained.iter().filter(|&&n| n == 0).count();
    assert_eq!(
        (full, none),
        (PER_IP, TRAINERS - PER_IP),
        "rounds trained: {trained:?}"
    );
    // Every trainer, the refused one too, has a direct connection from 127.0.0.1: the refusal is the cap's,
    // not an address still unknown.
    for (node, _) in &net.trainers {
        assert_eq!(
            net.coordinator.net().remote_ip(&node.peer_id()),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        );
    }
    net.stop().await;
}
