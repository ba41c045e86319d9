"""Finding 9 (admin API part): a NUL byte in a path or deeply nested JSON answered 500.
Plus hypothesis fuzzing of the admin API bodies: whatever the body, the answer is never a 5xx."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp_agent.demo import LocalAgent
from tests.security.admin_support import jbody, raw

FUZZ_EXAMPLES = int(os.environ.get("DWCP_FUZZ_EXAMPLES", "150"))  # each example is one HTTP request


def test_nul_byte_in_a_path_is_a_clear_400(agent: LocalAgent) -> None:
    body = {"source": str(agent.images / "vm\x00.img"), "to": "127.0.0.1:1", "dest_path": "/tmp/a\x00b"}
    status, answer = raw(agent.admin_port, "POST", "/api/v3/migrations", jbody(body))
    assert status == 400 and "NUL" in answer["error"]
    status, answer = raw(agent.admin_port, "GET", "/api/v3/migrations/a%00b")
    assert status == 400 and "NUL" in answer["error"]


def test_deeply_nested_json_is_a_clear_400(agent: LocalAgent) -> None:
    for depth in (33, 100_000):  # the guard's limit is 32 levels
        status, answer = raw(agent.admin_port, "POST", "/api/v3/migrations", b"[" * depth + b"]" * depth)
        assert status == 400 and "nested" in answer["error"], answer
    status, _ = raw(agent.admin_port, "POST", "/api/v3/vms/v/claim", b'{"host": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert status == 400


def test_bodies_over_one_mib_are_still_413(agent: LocalAgent) -> None:
    status, _ = raw(agent.admin_port, "POST", "/api/v3/migrations", b'"' + b"a" * (1 << 20) + b'"')
    assert status == 413


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
FIELDS = ["source", "to", "dest_path", "vm_id", "migration_id", "protocol", "host", "holder", "ttl_s",
          "from_host", "to_host", "fencing_token", "node_id", "addr", "target", "forced", "peer", "percentage",
          "enable_v3", "reason"]
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200))
ROUTES = ["/api/v3/migrations", "/api/v3/vms/fuzz/claim", "/api/v3/vms/fuzz/lease", "/api/v3/vms/fuzz/transfer",
          "/api/v3/cluster/protocol", "/api/v3/cluster/reinstate", "/api/v3/rollout"]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_fuzzed_admin_bodies_never_answer_5xx(agent: LocalAgent, route: str, body: bytes) -> None:
    status, answer = raw(agent.admin_port, "POST", route, body)
    assert status < 500, (route, body, answer)
