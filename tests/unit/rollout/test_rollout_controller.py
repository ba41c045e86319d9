"""Rollout controller: stable profile choice, rollback freezes, stores."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dwcp_agent.config import load_config
from dwcp_agent.rollout.controller import (
    FileRolloutStore,
    MemoryRolloutStore,
    RolloutController,
    RolloutError,
    RolloutState,
    rollout_bucket,
)


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def test_bucket_is_stable_across_processes_and_spreads_evenly():
    # A fixed id maps to a fixed bucket forever: hosts and restarts agree on a migration's profile.
    assert rollout_bucket("vm-42/migration-1") == rollout_bucket("vm-42/migration-1")
    assert rollout_bucket("migration-0001") == 49  # pinned: changing the hash reshuffles live rollouts
    counts = [0] * 100
    for i in range(20000):
        counts[rollout_bucket(f"m-{i}")] += 1
    assert min(counts) > 120 and max(counts) < 290


def test_share_of_v3_follows_percentage_and_raising_it_never_moves_a_migration_back(config, metrics, clock):
    rollout = RolloutController(dataclasses.replace(config, feature_flag_rollout=10), metrics, clock)
    ids = [f"mig-{i}" for i in range(5000)]
    at10 = {m for m in ids if rollout.profile_for(m) == "v3"}
    assert 400 < len(at10) < 600
    rollout.set_percentage(50)
    at50 = {m for m in ids if rollout.profile_for(m) == "v3"}
    assert at10 <= at50 and 2250 < len(at50) < 2750
    assert sample(metrics, "dwcp_v3_rollout_percentage") == 50


def test_enable_v3_false_sends_everything_to_v1(config, metrics, clock):
    rollout = RolloutController(dataclasses.replace(config, enable_v3=False), metrics, clock)
    assert {rollout.profile_for(f"m{i}") for i in range(200)} == {"v1"}
    assert sample(metrics, "dwcp_v3_rollout_percentage") == 0


def test_rollback_freezes_until_unfreeze(config, metrics, clock):
    rollout = RolloutController(config, metrics, clock)
    assert rollout.state.percentage == 100
    rollout.rollback("manual", detail="canary looked bad")
    assert rollout.state.percentage == 0 and rollout.state.frozen
    assert rollout.state.reason == "manual: canary looked bad"
    assert {rollout.profile_for(f"m{i}") for i in range(200)} == {"v1"}
    assert sample(metrics, "dwcp_v3_rollbacks_total", reason="manual") == 1
    assert sample(metrics, "dwcp_v3_rollout_frozen") == 1
    with pytest.raises(RolloutError, match="frozen"):
        rollout.set_percentage(10)
    rollout.set_percentage(0)  # staying at 0 is always allowed
    rollout.unfreeze()
    rollout.set_percentage(10)
    assert rollout.state.percentage == 10 and not rollout.state.frozen
    assert [e["event"] for e in rollout.events] == ["rollback", "set", "unfreeze", "set"]


def test_rollback_reason_is_a_fixed_label(config, metrics, clock):
    rollout = RolloutController(config, metrics, clock)
    with pytest.raises(RolloutError):
        rollout.rollback("anything the caller typed")


def test_percentage_out_of_range_is_refused(config, metrics, clock):
    rollout = RolloutController(config, metrics, clock)
    for bad in (-1, 101):
        with pytest.raises(RolloutError):
            rollout.set_percentage(bad)


def test_versions_grow_with_each_change(config, metrics, clock):
    store = MemoryRolloutStore()
    rollout = RolloutController(config, metrics, clock, store)
    first = rollout.state.version
    rollout.set_percentage(20)
    rollout.rollback()
    assert store.load().version == first + 2


def test_file_store_keeps_a_rollback_across_restarts(tmp_path, metrics, clock):
    path = tmp_path / "state" / "rollout.json"
    config = load_config(environ={"FEATURE_FLAG_ROLLOUT": "40"}, overrides={"node_id": "a"})
    RolloutController(config, metrics, clock, FileRolloutStore(path)).rollback("sla_nogo")
    restarted = RolloutController(config, metrics, clock, FileRolloutStore(path))
    assert restarted.state.frozen and restarted.state.percentage == 0
    assert json.loads(path.read_text())["frozen"] is True


def test_without_a_rollback_the_config_applies_at_each_start(tmp_path, metrics, clock):
    path = tmp_path / "rollout.json"
    store = FileRolloutStore(path)
    RolloutController(load_config(environ={"FEATURE_FLAG_ROLLOUT": "40"}), metrics, clock, store).set_percentage(60)
    # The operator halts with FEATURE_FLAG_ROLLOUT=0 (the playbook's command) and restarts.
    halted = RolloutController(load_config(environ={"FEATURE_FLAG_ROLLOUT": "0"}), metrics, clock, store)
    assert halted.state.percentage == 0


def test_an_authoritative_store_wins_over_local_config(metrics, clock):
    class Registry(MemoryRolloutStore):
        authoritative = True

    store = Registry(RolloutState(percentage=30, version=7))
    rollout = RolloutController(load_config(environ={"FEATURE_FLAG_ROLLOUT": "100"}), metrics, clock, store)
    assert rollout.state.percentage == 30 and rollout.state.version == 7
    assert sample(metrics, "dwcp_v3_rollout_percentage") == 30


def test_unreadable_file_counts_as_no_state(tmp_path, metrics, clock):
    path = tmp_path / "rollout.json"
    path.write_text("{not json")
    rollout = RolloutController(load_config(environ={}), metrics, clock, FileRolloutStore(path))
    assert rollout.state.percentage == 100
