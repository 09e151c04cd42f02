"""The shared queue order: one account's poll a cycle reads the cluster's queue for every portal job it sees."""

from __future__ import annotations

from jobs.cluster.remote import PollResult
from jobs.sessions import queue_order


def polled(**places: tuple[str, int]) -> PollResult:
    result = PollResult()
    result.positions = {(partition, job_id): place for job_id, (partition, place) in places.items()}
    return result


def test_one_poll_a_cycle_reads_the_queue_and_the_others_take_their_places_from_it(db: None) -> None:
    assert queue_order.to_read(1, ["101"]) == queue_order.ALL
    first = polled(**{"101": ("gpu", 3), "202": ("gpu", 5)})  # it sees another account's job too
    queue_order.share(1, first, queue_order.ALL, ["101"])
    assert queue_order.to_read(1, ["202"]) == queue_order.NONE  # within the same interval: not read again
    second = polled()
    queue_order.share(1, second, queue_order.NONE, ["202"])
    assert second.queue_position("gpu", "202") == 5
    assert queue_order.to_read(2, ["101"]) == queue_order.ALL  # another cluster's queue is its own


def test_an_account_whose_jobs_the_shared_order_lacks_reads_its_own(db: None) -> None:
    queue_order.to_read(1, ["101"])
    queue_order.share(1, polled(**{"101": ("gpu", 3)}), queue_order.ALL, ["101"])
    # PrivateData=jobs: the reader could not see job 303, so its owner's poll reads the queue itself.
    assert queue_order.to_read(1, ["303"]) == queue_order.OWN
    own = polled(**{"303": ("gpu", 1)})
    queue_order.share(1, own, queue_order.OWN, ["303"])
    later = polled()
    queue_order.share(1, later, queue_order.NONE, ["101", "303"])
    assert later.queue_position("gpu", "101") == 3 and later.queue_position("gpu", "303") == 1
    # A poll is given the places of its own pending jobs only.
    other = polled()
    queue_order.share(1, other, queue_order.NONE, ["303"])
    assert other.positions == {("gpu", "303"): 1}


def test_a_poll_without_pending_jobs_reads_no_queue(db: None) -> None:
    assert queue_order.to_read(1, []) == queue_order.NONE
