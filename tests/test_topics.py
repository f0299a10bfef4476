"""When the gateway warns that a topic's 2xx may rest on one broker's disk."""

from __future__ import annotations

import pytest

from gateway.kafka.topics import is_single_copy


@pytest.mark.parametrize(
    ("replicas", "min_insync", "single"),
    [
        (3, 1, True),  # Kafka's default min.insync.replicas on a replicated topic
        (5, 1, True),
        (3, 2, False),  # what the gateway sets on topics it creates
        (3, 3, False),
        (2, 1, False),  # two replicas: requiring both is the operator's trade to make
        (1, 1, False),  # a single broker: one copy is all there is
    ],
)
def test_a_topic_is_single_copy_when_three_replicas_need_only_one_in_sync(
    replicas: int, min_insync: int, single: bool
) -> None:
    assert is_single_copy(replicas, min_insync) is single
