"""RayShardedIndex on a simulated cluster of three nodes (``ray.cluster_utils.Cluster``).

The driver's node has no CPU for actors; two worker nodes of one CPU each
hold the actors, a group's two replicas on different nodes. When a node
goes away, every group still has a replica: the results stay complete and
equal to ShardedIndex.search.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from fastface import IVFPQParams, ShardedIndex
from fastface.datasets import SyntheticFaces
from fastface.distributed import RayShardedIndex

pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray(\..*)?")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20},
    )
    nodes = [c.add_node(num_cpus=1, object_store_memory=80 * 2**20) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_replicas_on_two_nodes_survive_the_loss_of_one(cluster, tmp_path) -> None:
    c, nodes = cluster
    xb, _ = SyntheticFaces(n_identities=300, per_identity=10, d=32, seed=1).vectors()
    xq = xb[:30] + np.float32(0.01)
    path = tmp_path / "idx"
    ShardedIndex.build(xb, path, IVFPQParams(32, 16, 8), shard_size=800, progress=False).close()
    local = ShardedIndex.open(path)
    want = local.search(xq, 10, nprobe=8, rerank=2)
    with RayShardedIndex(
        path, actors=2, replicas=2, num_cpus_per_actor=0.5, timeout=30, max_restarts=0
    ) as rx:
        info = rx.info()
        for g in info["groups"]:
            assert len({r["node_id"] for r in g["replicas"]}) == 2  # one replica per node
        assert {r["node_id"] for g in info["groups"] for r in g["replicas"]} == {
            n.node_id for n in nodes
        }
        res = rx.search(xq, 10, nprobe=8, rerank=2)
        assert res.complete and np.array_equal(res[1], want[1]) and np.array_equal(res[0], want[0])
        c.remove_node(nodes[1])
        for _ in range(3):  # the first call finds the dead replicas, the next go around them
            res = rx.search(xq, 10, nprobe=8, rerank=2)
            assert res.complete
            assert np.array_equal(res[0], want[0]) and np.array_equal(res[1], want[1])
        alive = [r["alive"] for g in rx.info()["groups"] for r in g["replicas"]]
        assert sorted(alive) == [False, False, True, True]
