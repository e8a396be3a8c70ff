"""``local_replicas: N``: N processes of one expert on consecutive ports, each a supervised child
of its own, all in the gateway's pool. (Serving and restarting them with real engines:
tests/integration/test_resume.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from expertmesh.config import parse_config
from expertmesh.gateway.pool import replica_addresses
from expertmesh.supervisor import Supervisor

CONFIG = {
    "expert_base_port": 52000,
    "experts": [
        {"expert_id": "code", "domain": "code", "model_path": "/m/code", "local_replicas": 3},
        {
            "expert_id": "general",
            "domain": "general",
            "model_path": "/m/general",
            "replicas": ["10.0.0.9:50051"],
        },
    ],
}


def test_local_replicas_take_consecutive_ports_and_the_next_expert_the_port_after() -> None:
    config = parse_config(json.dumps(CONFIG), Path("mesh.json"))
    assert config.replica_ports(0) == [52000, 52001, 52002]
    assert config.local_addresses(1) == ["127.0.0.1:52003"]
    assert replica_addresses(config) == {
        "code": ["127.0.0.1:52000", "127.0.0.1:52001", "127.0.0.1:52002"],
        "general": ["127.0.0.1:52003", "10.0.0.9:50051"],  # then the replicas run elsewhere
    }


def test_up_runs_one_process_per_local_replica(tmp_path: Path) -> None:
    config = parse_config(json.dumps(CONFIG), Path("mesh.json"))
    supervisor = Supervisor(config, tmp_path / "mesh.yaml", tmp_path / "logs", report=lambda _: None)
    children = {c.name: c for c in supervisor.experts}
    assert list(children) == ["code#0", "code#1", "code#2", "general"]
    for r in range(3):
        child = children[f"code#{r}"]
        assert child.argv[-4:] == ["--expert-id", "code", "--replica", str(r)]
        assert child.address == f"127.0.0.1:{52000 + r}"
        assert child.log_path == tmp_path / "logs" / f"code-{r}.log"
