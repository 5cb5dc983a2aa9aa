"""The campaign's verdicts: what counts as identical, as a clean error, as wrong; what counts
as something still held after a segment. A judge that let anything through would make the
campaign's zeros meaningless."""

from kvgrid.chaos.campaign import busy
from kvgrid.chaos.workload import CLEAN, HUNG, IDENTICAL, WRONG, Answer, Workload, judge

REF = {"text": "The sea is wide and deep.", "finish_reason": "length"}


def test_identical_means_same_text_and_finish_reason():
    ok = Answer(status=200, text=REF["text"], finish_reason="length", done=True)
    assert judge(ok, REF, "none")[0] == IDENTICAL
    assert judge(Answer(status=200, text="The sea is wide.", finish_reason="length",
                        done=True), REF, "none")[0] == WRONG  # fmt: skip
    assert judge(Answer(status=200, text=REF["text"], finish_reason="stop", done=True),
                 REF, "none")[0] == WRONG  # fmt: skip
    # a stream that ended without [DONE] is not an answer
    assert (
        judge(Answer(status=200, text=REF["text"], finish_reason="length"), REF, "none")[0] == WRONG
    )


def test_clean_errors_need_the_right_status_and_a_correct_prefix():
    assert judge(Answer(status=503, error="no worker"), REF, "none")[0] == CLEAN
    assert judge(Answer(status=502, error="lost"), REF, "none")[0] == CLEAN
    assert judge(Answer(status=500, error="internal"), REF, "none")[0] == WRONG
    assert judge(Answer(status=400, error="bad"), REF, "none")[0] == WRONG
    cut = Answer(status=200, text="The sea", error="lost", done=True)
    assert judge(cut, REF, "none")[0] == CLEAN  # an error event after correct text
    bad = Answer(status=200, text="The sky", error="lost", done=True)
    assert judge(bad, REF, "none")[0] == WRONG


def test_lost_connections_closed_streams_and_hangs():
    lost = Answer(text="The sea", transport="lost")
    assert judge(lost, REF, "router_restart")[0] == CLEAN
    assert judge(lost, REF, "worker_kill_stream")[0] == WRONG
    assert judge(Answer(text="The sea", transport="closed"), REF, "client_disconnect")[0] == CLEAN
    assert judge(Answer(text="A sea", transport="closed"), REF, "client_disconnect")[0] == WRONG
    assert judge(Answer(transport="hung"), REF, "none")[0] == HUNG


def test_anything_held_after_a_segment_is_reported():
    idle_worker = {"num_running": 0, "num_waiting": 0, "sinks": 0, "g1_blocks_in_use": 0,
                   "store": {"pinned_blocks": 0, "leases": 0, "writes_in_flight": 0,
                             "tiers": {"G3": {"up": False}}}}  # fmt: skip
    state = {"admission": {"running": 0, "waiting": 0, "runs": 0},
             "router": {"inflight": {"w0": 0}},
             "workers": {"w0": {"up": True, "state": idle_worker},
                         "w1": {"up": False, "state": None}}}  # fmt: skip
    assert busy(state) == {}
    idle_worker["store"]["pinned_blocks"] = 2
    idle_worker["g1_blocks_in_use"] = 5
    state["admission"]["running"] = 1
    assert busy(state) == {"admission.running": 1, "w0.g1_blocks_in_use": 5,
                           "w0.store.pinned_blocks": 2}  # fmt: skip


def test_the_workload_is_fixed_by_its_seed():
    a, b, c = Workload(seed=3), Workload(seed=3), Workload(seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    answers = {f"0:{t}": {"text": f"answer {t}"} for t in range(3)}
    body = a.body(a.turns_of(0)[2], answers)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user",
                                                     "assistant", "user"]  # fmt: skip
    assert body["temperature"] == 0 and body["messages"][2]["content"] == "answer 0"
