"""The HAProxy log reader of the live load-balancer tests, on lines a real HAProxy 2.6 wrote (the clean-clone CI
run of b0fc5b8, test_failed_backend_is_taken_out_and_back)."""

from tests.integration import haproxy_log

_CP1 = "kube-apiserver kube-apiserver/staging-cp-1"
_CP3 = "kube-apiserver kube-apiserver/staging-cp-3"
_DOWN = (
    'Server kube-apiserver/staging-cp-2 is DOWN, reason: Layer4 connection problem, info: "Connection refused",'
    " check duration: 1ms. 2 active and 0 backup servers left. 1 sessions active, 0 requeued, 0 remaining in queue."
)
LOG = "\n".join(
    [
        f"<6>10.17.4.200:52618 [06/Dec/2026:00:29:08.375] {_CP1} 1/0/3 1642 -- 1/1/0/0/0 0/0",
        f"[WARNING]  (4982) : {_DOWN}",
        f"<1>{_DOWN}",
        f"<6>10.17.4.200:52632 [06/Dec/2026:00:29:08.398] {_CP3} 2/0/1 0 D- 1/1/0/0/+1 0/0",
        f"<6>10.17.4.200:52644 [06/Dec/2026:00:29:08.423] {_CP1} 1/0/3 1644 -- 1/1/0/0/0 0/0",
    ]
)


def test_sessions_are_read_with_their_server_and_termination_state() -> None:
    sessions = haproxy_log.sessions(LOG)
    assert [(s.server, s.state) for s in sessions] == [
        ("staging-cp-1", "--"),
        ("staging-cp-3", "D-"),
        ("staging-cp-1", "--"),
    ]
    assert [s.killed_at_mark_down for s in sessions] == [False, True, False]


def test_a_mark_down_is_counted_once_with_the_sessions_it_cut() -> None:
    assert haproxy_log.active_at_mark_down(LOG, "kube-apiserver", "staging-cp-2") == [1]
    assert haproxy_log.active_at_mark_down(LOG, "kube-apiserver", "staging-cp-1") == []
