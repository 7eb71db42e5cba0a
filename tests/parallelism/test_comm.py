"""RingComm: the send / commit / wait protocol raises on misuse; bytes are counted."""

from __future__ import annotations

import pytest
import torch

from parallelism import CommProtocolError, RingComm


def test_single_rank_ring_has_no_peers():
    comm = RingComm([0], channel="t")
    assert (comm.position, comm.next_rank, comm.prev_rank) == (0, 0, 0)
    with pytest.raises(CommProtocolError, match="peers must be other members"):
        comm.send(torch.ones(2), to=0)
    with pytest.raises(CommProtocolError, match="commit\\(\\) with nothing queued"):
        comm.commit()
    with pytest.raises(CommProtocolError, match="wait\\(\\) without a committed batch"):
        comm.wait()
    comm.close()


def test_ring_must_name_ranks_of_this_world():
    with pytest.raises(ValueError, match=r"entries \[1, 2\] that are not ranks of this world"):
        RingComm([1, 2], channel="t")


@pytest.mark.distributed
def test_protocol_misuse_raises_and_bytes_are_counted(misuse_world):
    """3 ranks, ring [2, 0, 1] (shared launch: tests/parallelism/conftest.py)."""
    for rank, res in enumerate(r["protocol"] for r in misuse_world):
        ring = [2, 0, 1]
        pos = ring.index(rank)
        assert res["prev"] == ring[pos - 1] and res["next"] == ring[(pos + 1) % 3]
        assert res["got"] == float(res["prev"])  # the previous member's tensor arrived
        errors = res["errors"]
        assert "peers must be other members" in errors["send_to_stranger"]
        assert "contiguous" in errors["non_contiguous"]
        assert "in flight" in errors["send_in_flight"]
        assert "commit() twice" in errors["commit_twice"]
        assert "every commit() needs a wait()" in errors["close_in_flight"]
        assert "without a committed batch" in errors["wait_twice"]
        assert res["sent"] == {"t": 3 * 5 * 4} and res["received"] == {"t": 3 * 5 * 4}
