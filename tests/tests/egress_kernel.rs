//! Block mode's refusals that depend on the hook set, through a real sensor: the kernel matrix
//! runs these on Debian's 6.1 and 6.12 too, where the BPF LSM set loads (this host has none).
//!
//! A packet socket (`AF_PACKET`) passes none of the cgroup hooks: only the LSM `socket_create`
//! hook can refuse it. Where it is attached, a job in block mode gets `EPERM` and the event says
//! blocked; elsewhere the socket is created and reported.

use integration_tests::{TestEnv, harness};
use runner_monitor::{
    event::{EventDetail, RawSocketKind},
    policy::EgressPlan,
    sensor::hook_sets::{HookFamily, HookSet},
};

#[test]
fn a_packet_socket_is_refused_in_block_mode_where_socket_create_is_hooked() {
    let h = harness();
    let env = TestEnv::new("packet-socket");
    let go = env.dir.join("go");
    let out = env.dir.join("sockets.out");
    // The job waits until its block-mode plan is written.
    let run = h.start_job(
        &env,
        &format!(
            "while [ ! -e {go} ]; do sleep 0.02; done; \
             \"$JOB_STEP\" socket packet > {out}; \"$JOB_STEP\" socket tcp >> {out}",
            go = go.display(),
            out = out.display()
        ),
    );
    let plan = EgressPlan {
        block: true,
        ..EgressPlan::default()
    };
    h.sensor().egress_mut().set_job(run.key, &plan).unwrap();
    std::fs::write(&go, "").unwrap();
    let job = run.wait_success();
    let lsm = h.hook_set(HookFamily::PacketSockets) == HookSet::Lsm;
    // Where BPF LSM is active the hook is expected: its absence is no pass.
    assert_eq!(
        lsm,
        runner_monitor::sensor::hook_sets::bpf_lsm_active().is_ok(),
        "the packet sockets' hook set"
    );
    let answers = std::fs::read_to_string(&out).unwrap();
    let answers: Vec<&str> = answers.lines().collect();
    assert_eq!(
        answers,
        [if lsm { "errno 1" } else { "ok" }, "ok"],
        "packet socket, then a TCP socket (lsm socket_create attached: {lsm})"
    );
    let event = h.wait_for("the packet socket", |e| {
        e.job.as_ref().is_some_and(|j| j.key == job)
            && matches!(&e.detail, EventDetail::Connect(c)
                if c.raw_socket.is_some_and(|r| r.kind == RawSocketKind::Packet))
    });
    let EventDetail::Connect(c) = &event.detail else {
        unreachable!()
    };
    assert_eq!(c.blocked, lsm, "{c:?}");
    assert_eq!(
        c.raw_socket.map(|r| r.protocol),
        Some((libc::ETH_P_ALL as u16).to_be())
    );
    h.sensor().egress_mut().forget_job(job).unwrap();
}
